//! Mesh-wide settings: the `meshConfig` block of Istio's mesh configuration.

use std::collections::BTreeMap;

use crate::decode::{self, Fields};
use crate::diag::Sink;
use crate::yaml::{Node, Pos};

/// Why Istio reads the mesh config leniently: it ignores fields it does
/// not know (`protomarshal.ApplyYAML`).
const IGNORED_AS_IN_ISTIO: &str = "Istio ignores mesh settings it does not know";

/// A problem with one extension provider that Istio loads the mesh config
/// with, but that makes the provider unusable: every workload whose CUSTOM
/// policies name it gets a deny-all filter instead (pilot's
/// `processExtensionProvider` / `getExtAuthz`).
struct Problem {
    pos: Pos,
    field: String,
    message: String,
}

/// Istio MeshConfig fields that meshward accepts but does not act on, so an
/// existing mesh config loads (with one warning naming them).
const NOT_ACTED_ON: &[&str] = &[
    "accessLogFile",
    "accessLogFormat",
    "accessLogEncoding",
    "enableTracing",
    "enableEnvoyAccessLogService",
    "inboundTrafficPolicy",
    "localityLbSetting",
    "dnsRefreshRate",
    "protocolDetectionTimeout",
    "ingressClass",
    "ingressService",
    "ingressControllerMode",
    "ingressSelector",
    "enablePrometheusMerge",
    "defaultServiceExportTo",
    "defaultVirtualServiceExportTo",
    "defaultDestinationRuleExportTo",
    "discoverySelectors",
    "defaultHttpRetryPolicy",
    "caCertificates",
    "certificates",
    "serviceSettings",
    "tcpKeepalive",
    "inboundClusterStatName",
    "outboundClusterStatName",
    "verifyCertificateAtClient",
    "defaultProviders",
    "configSources",
    "h2UpgradePolicy",
    "proxyListenPort",
    "proxyInboundListenPort",
    "proxyHttpPort",
    "meshMTLS",
    "tlsDefaults",
    "serviceScopeConfigs",
];

/// Path normalization applied before authorization path matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PathNormalization {
    None,
    #[default]
    Base,
    MergeSlashes,
    DecodeAndMergeSlashes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtensionProvider {
    pub name: String,
    /// `envoyExtAuthzHttp` or `envoyExtAuthzGrpc` for authorization providers;
    /// other kinds (tracing, logging) are kept by name only.
    pub kind: String,
    pub service: Option<String>,
    pub port: Option<u16>,
    /// Provider settings as written, for the data plane to interpret.
    pub settings: serde_json::Value,
    /// The settings of an authorization provider, validated.
    pub authz: Option<ExtAuthz>,
}

/// The settings of an `envoyExtAuthzHttp` or `envoyExtAuthzGrpc` provider.
/// Header lists take names (`x-user`), prefixes (`x-auth-*`) and suffixes
/// (`*-token`), as Istio's do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtAuthz {
    /// How long the proxy waits for an answer (`timeout`; Istio's default
    /// is 10 minutes).
    pub timeout_ms: u64,
    /// Allow the request when the provider cannot be reached or fails.
    pub fail_open: bool,
    /// The status a client gets when the provider cannot be reached or
    /// fails, and `fail_open` is false (default 403).
    pub status_on_error: u16,
    /// HTTP: prefixed to the request path in the check request.
    pub path_prefix: String,
    /// HTTP: request headers sent in the check request (besides `Host`, the
    /// method and the path, which always go).
    pub include_request_headers: Vec<String>,
    /// HTTP: fixed headers added to the check request.
    pub include_additional_headers: BTreeMap<String, String>,
    /// HTTP: headers of an allowing answer set on the forwarded request.
    pub headers_to_upstream_on_allow: Vec<String>,
    /// HTTP: headers of a denying answer sent to the client.
    pub headers_to_downstream_on_deny: Vec<String>,
    /// HTTP: headers of an allowing answer added to the response.
    pub headers_to_downstream_on_allow: Vec<String>,
}

impl Default for ExtAuthz {
    fn default() -> Self {
        ExtAuthz {
            timeout_ms: 600_000,
            fail_open: false,
            status_on_error: 403,
            path_prefix: String::new(),
            include_request_headers: Vec::new(),
            include_additional_headers: BTreeMap::new(),
            headers_to_upstream_on_allow: Vec::new(),
            headers_to_downstream_on_deny: Vec::new(),
            headers_to_downstream_on_allow: Vec::new(),
        }
    }
}

/// Whether header `name` (lower case) is one of `patterns`: exact names,
/// `prefix*` or `*suffix`, without regard to case.
pub fn header_listed(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| {
        let p = p.as_str();
        if let Some(prefix) = p.strip_suffix('*') {
            name.len() >= prefix.len() && name[..prefix.len()].eq_ignore_ascii_case(prefix)
        } else if let Some(suffix) = p.strip_prefix('*') {
            name.len() >= suffix.len()
                && name[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        } else {
            p.eq_ignore_ascii_case(name)
        }
    })
}

/// Decodes the body of an authorization provider (`kind`). Settings Istio
/// refuses to build the provider with go to `problems`; settings meshward
/// cannot honour are errors.
fn decode_ext_authz(
    sink: &mut Sink<'_>,
    node: &Node,
    path: &str,
    kind: &str,
    problems: &mut Vec<Problem>,
) -> ExtAuthz {
    let http = kind == "envoyExtAuthzHttp";
    let mut f = Fields::new(sink, node, path);
    let mut a = ExtAuthz::default();
    // `service` and `port` are read (and checked) by the caller.
    f.ignore("service");
    f.ignore("port");
    // Where a field is, for its errors.
    let at = |f: &Fields<'_>, key: &str| f.peek(key).map_or(f.pos(), |n| n.pos);
    let timeout_pos = at(&f, "timeout");
    if let Some(t) = f.string(sink, "timeout") {
        match super::security::check_duration(&t).and_then(|()| super::security::parse_duration(&t))
        {
            Ok(secs) => a.timeout_ms = (secs * 1000.0).round() as u64,
            Err(e) => sink.error(timeout_pos, &f.field_path("timeout"), e),
        }
    }
    a.fail_open = f.bool(sink, "failOpen").unwrap_or(false);
    // There are no routes to clear here.
    let _ = f.bool(sink, "clearRouteCache");
    let status_pos = at(&f, "statusOnError");
    if let Some(s) = f.string(sink, "statusOnError") {
        match s.parse::<u16>() {
            Ok(code) if (200..=599).contains(&code) => a.status_on_error = code,
            _ => problems.push(Problem {
                pos: status_pos,
                field: f.field_path("statusOnError"),
                message: format!("\"{s}\" is not an HTTP status code (200-599)"),
            }),
        }
    }
    if f.peek("includeRequestBodyInCheck").is_some() {
        sink.error(
            at(&f, "includeRequestBodyInCheck"),
            &f.field_path("includeRequestBodyInCheck"),
            "meshward does not send the request body to an authorization provider; \
             remove includeRequestBodyInCheck (a provider that needs the body would decide without it)",
        );
        f.ignore("includeRequestBodyInCheck");
    }
    if http {
        let prefix_pos = at(&f, "pathPrefix");
        a.path_prefix = f.string(sink, "pathPrefix").unwrap_or_default();
        if !a.path_prefix.is_empty() && !a.path_prefix.starts_with('/') {
            problems.push(Problem {
                pos: prefix_pos,
                field: f.field_path("pathPrefix"),
                message: format!("pathPrefix \"{}\" must start with /", a.path_prefix),
            });
        }
        let lists = [
            "includeRequestHeadersInCheck",
            "includeHeadersInCheck",
            "headersToUpstreamOnAllow",
            "headersToDownstreamOnDeny",
            "headersToDownstreamOnAllow",
        ];
        for key in lists {
            let Some(crate::yaml::Value::Seq(items)) = f.peek(key).map(|n| &n.value) else {
                continue;
            };
            for (i, item) in items.iter().enumerate() {
                let Some(name) = item.scalar_text() else {
                    continue;
                };
                let field = format!("{}[{i}]", f.field_path(key));
                let core = name.trim_start_matches('*').trim_end_matches('*');
                if name == "*" {
                    // Istio's `checkWildcard` in `buildExtAuthzHTTP`.
                    problems.push(Problem {
                        pos: item.pos,
                        field,
                        message: "a single \"*\" is not supported (use a prefix or a suffix)"
                            .to_string(),
                    });
                } else if core.is_empty()
                    || !core
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
                {
                    sink.warn(
                        item.pos,
                        &field,
                        format!("\"{name}\" never matches a header: it is not a header name"),
                    );
                }
            }
        }
        a.include_request_headers = f.strings(sink, "includeRequestHeadersInCheck");
        // The deprecated name of the same list.
        a.include_request_headers
            .extend(f.strings(sink, "includeHeadersInCheck"));
        a.include_additional_headers = f.string_map(sink, "includeAdditionalHeadersInCheck");
        a.headers_to_upstream_on_allow = f.strings(sink, "headersToUpstreamOnAllow");
        a.headers_to_downstream_on_deny = f.strings(sink, "headersToDownstreamOnDeny");
        a.headers_to_downstream_on_allow = f.strings(sink, "headersToDownstreamOnAllow");
        // Headers meshward adds to every check request: a bad name would
        // make the check requests themselves malformed.
        for name in a.include_additional_headers.keys() {
            let valid = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !valid {
                sink.error(f.pos(), path, format!("\"{name}\" is not a header name"));
            }
        }
        // The provider's answer never edits these; listing one for the
        // request's way on is a mistake worth saying.
        let edited = a
            .headers_to_upstream_on_allow
            .iter()
            .chain(&a.headers_to_downstream_on_allow);
        for name in edited {
            if super::security::PROXY_OWNED_HEADERS
                .iter()
                .any(|h| h.eq_ignore_ascii_case(name))
            {
                sink.error(
                    f.pos(),
                    path,
                    format!(
                        "header \"{name}\" is set by the proxy (framing, routing or identity) and cannot come from the provider"
                    ),
                );
            }
        }
        for (name, value) in &a.include_additional_headers {
            if value.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f) {
                sink.error(
                    f.pos(),
                    &f.field_path("includeAdditionalHeadersInCheck"),
                    format!("the value of \"{name}\" has control characters"),
                );
            }
        }
    }
    f.finish_ignoring_unknown(sink, IGNORED_AS_IN_ISTIO);
    a
}

impl ExtensionProvider {
    pub fn is_authz(&self) -> bool {
        self.kind == "envoyExtAuthzHttp" || self.kind == "envoyExtAuthzGrpc"
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshConfig {
    pub root_namespace: String,
    pub trust_domain: String,
    pub trust_domain_aliases: Vec<String>,
    pub extension_providers: Vec<ExtensionProvider>,
    /// Providers defined with a problem that makes them unusable, by name,
    /// with the first problem. They are left out of `extension_providers`,
    /// so a CUSTOM policy naming one denies as for an undefined provider.
    pub invalid_providers: BTreeMap<String, String>,
    pub enable_auto_mtls: bool,
    pub path_normalization: PathNormalization,
    /// meshward extension: default workload certificate lifetime (Go duration).
    pub workload_cert_ttl: Option<String>,
    /// How long a proxy may take to connect to an upstream, TLS handshake
    /// included, where no DestinationRule sets `connectTimeout`; also for
    /// its connections to its own application (`connectTimeout`, 10 s by
    /// default as in Istio).
    pub connect_timeout: std::time::Duration,
    /// `defaultConfig.terminationDrainDuration`: how long a proxy told to
    /// stop lets its connections finish (unset: the proxy's default,
    /// Istio's 5 s). The only `defaultConfig` (ProxyConfig) field meshward
    /// acts on.
    pub termination_drain_duration: Option<std::time::Duration>,
    /// `outboundTrafficPolicy.mode`: what a captured connection to an
    /// address outside the mesh gets (only traffic capture sees such
    /// connections).
    pub outbound_traffic_policy: OutboundTrafficPolicy,
}

/// `outboundTrafficPolicy.mode`: where a captured connection to a
/// destination no service or endpoint of the mesh owns goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutboundTrafficPolicy {
    /// Passed through to the original destination, untouched (Istio's
    /// default, its `PassthroughCluster`).
    #[default]
    AllowAny,
    /// Refused (Istio's `BlackHoleCluster`).
    RegistryOnly,
}

impl OutboundTrafficPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            OutboundTrafficPolicy::AllowAny => "ALLOW_ANY",
            OutboundTrafficPolicy::RegistryOnly => "REGISTRY_ONLY",
        }
    }
}

/// The longest `defaultConfig.terminationDrainDuration` meshward accepts:
/// an orchestrator stops a workload long before (Kubernetes' default
/// grace period is 30 s), so a longer one is a mistake.
pub const MAX_TERMINATION_DRAIN_DURATION: std::time::Duration =
    std::time::Duration::from_secs(3600);

/// Istio's default `meshConfig.connectTimeout`.
pub const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The bounds Istio's `ValidateConnectTimeout` puts on
/// `meshConfig.connectTimeout`.
const CONNECT_TIMEOUT_MAX: std::time::Duration = std::time::Duration::from_secs(3600);

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            root_namespace: "istio-system".to_string(),
            trust_domain: "cluster.local".to_string(),
            trust_domain_aliases: Vec::new(),
            extension_providers: Vec::new(),
            invalid_providers: BTreeMap::new(),
            enable_auto_mtls: true,
            path_normalization: PathNormalization::Base,
            workload_cert_ttl: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            termination_drain_duration: None,
            outbound_traffic_policy: OutboundTrafficPolicy::AllowAny,
        }
    }
}

impl MeshConfig {
    pub fn provider(&self, name: &str) -> Option<&ExtensionProvider> {
        self.extension_providers.iter().find(|p| p.name == name)
    }

    /// Decodes a `meshConfig` block.
    pub fn decode(sink: &mut Sink<'_>, node: &Node, path: &str) -> MeshConfig {
        let mut m = MeshConfig::default();
        let mut f = Fields::new(sink, node, path);
        let root_pos = f.peek("rootNamespace").map_or(f.pos(), |n| n.pos);
        if let Some(ns) = f.string(sink, "rootNamespace") {
            // Istio does not check it; a name no namespace can have makes
            // no policy mesh-wide.
            if let Err(e) = super::check_namespace(&ns) {
                sink.warn(
                    root_pos,
                    &f.field_path("rootNamespace"),
                    format!("{e}: no namespace has this name, so no policy applies mesh-wide"),
                );
            }
            m.root_namespace = ns;
        }
        if let Some(td) = f.string(sink, "trustDomain") {
            if let Err(e) = check_trust_domain(&td) {
                sink.error(f.pos(), &f.field_path("trustDomain"), e);
            }
            m.trust_domain = td;
        }
        m.trust_domain_aliases = f.strings(sink, "trustDomainAliases");
        for (i, td) in m.trust_domain_aliases.iter().enumerate() {
            if let Err(e) = check_trust_domain(td) {
                sink.error(
                    f.pos(),
                    &format!("{}[{i}]", f.field_path("trustDomainAliases")),
                    e,
                );
            }
        }
        if let Some(b) = f.bool(sink, "enableAutoMtls") {
            m.enable_auto_mtls = b;
        }
        let pn_path = f.field_path("pathNormalization");
        if let Some(pn) = f.take("pathNormalization") {
            let mut pf = Fields::new(sink, pn, &pn_path);
            let norm_path = pf.field_path("normalization");
            if let Some(n) = pf.take("normalization")
                && let Some(s) = decode::string(sink, n, &norm_path)
            {
                m.path_normalization = match s.as_str() {
                    "NONE" => PathNormalization::None,
                    "DEFAULT" | "BASE" => PathNormalization::Base,
                    "MERGE_SLASHES" => PathNormalization::MergeSlashes,
                    "DECODE_AND_MERGE_SLASHES" => PathNormalization::DecodeAndMergeSlashes,
                    _ => {
                        sink.error(n.pos, &norm_path, format!("unknown normalization \"{s}\" (expected NONE, BASE, MERGE_SLASHES or DECODE_AND_MERGE_SLASHES)"));
                        PathNormalization::Base
                    }
                };
            }
            pf.finish_ignoring_unknown(sink, IGNORED_AS_IN_ISTIO);
        }
        m.workload_cert_ttl = f.string(sink, "workloadCertTtl");
        if let Some(ttl) = &m.workload_cert_ttl
            && let Err(e) = super::security::check_duration(ttl)
        {
            sink.error(f.pos(), &f.field_path("workloadCertTtl"), e);
        }
        let ct_pos = f.peek("connectTimeout").map_or(f.pos(), |n| n.pos);
        if let Some(t) = f.string(sink, "connectTimeout") {
            // Istio refuses the whole mesh config with a bad one
            // (`ValidateMeshConfig`): 1ms to 1h, whole milliseconds.
            let checked = super::security::check_duration(&t)
                .and_then(|()| super::security::parse_duration(&t))
                .map(|secs| std::time::Duration::from_millis((secs * 1000.0).round() as u64))
                .and_then(|d| {
                    if d > CONNECT_TIMEOUT_MAX {
                        Err(format!("invalid connect timeout \"{t}\": at most 1h"))
                    } else {
                        Ok(d)
                    }
                });
            match checked {
                Ok(d) => m.connect_timeout = d,
                Err(e) => sink.error(ct_pos, &f.field_path("connectTimeout"), e),
            }
        }
        let otp_path = f.field_path("outboundTrafficPolicy");
        if let Some(otp) = f.take("outboundTrafficPolicy") {
            let mut of = Fields::new(sink, otp, &otp_path);
            let mode_path = of.field_path("mode");
            if let Some(n) = of.take("mode")
                && let Some(mode) = decode::string(sink, n, &mode_path)
            {
                // Istio's enum: ALLOW_ANY (the default) or REGISTRY_ONLY;
                // anything else fails its mesh config.
                match mode.as_str() {
                    "ALLOW_ANY" => m.outbound_traffic_policy = OutboundTrafficPolicy::AllowAny,
                    "REGISTRY_ONLY" => {
                        m.outbound_traffic_policy = OutboundTrafficPolicy::RegistryOnly;
                    }
                    _ => sink.error(
                        n.pos,
                        &mode_path,
                        format!("unknown mode \"{mode}\" (expected ALLOW_ANY or REGISTRY_ONLY)"),
                    ),
                }
            }
            of.finish_ignoring_unknown(sink, IGNORED_AS_IN_ISTIO);
        }
        let dc_path = f.field_path("defaultConfig");
        if let Some(dc) = f.take("defaultConfig") {
            m.termination_drain_duration = decode_default_config(sink, dc, &dc_path);
        }
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        let mut providers: Vec<ExtensionProvider> = Vec::new();
        let mut invalid: BTreeMap<String, String> = BTreeMap::new();
        f.list(sink, "extensionProviders", |sink, n, p| {
            let mut problems = Vec::new();
            let provider = decode_provider(sink, n, p, &mut problems)?;
            let name = provider.name.clone();
            // Istio merges providers by name: a later one replaces the
            // earlier one's settings (`ApplyMeshConfig`).
            if let Some(first) = seen.insert(name.clone(), p.to_string()) {
                sink.warn(
                    n.pos,
                    &format!("{p}.name"),
                    format!(
                        "extension provider \"{name}\" is also defined at {first}; this definition replaces that one, as in Istio"
                    ),
                );
                providers.retain(|x| x.name != name);
                invalid.remove(&name);
            }
            match problems.first() {
                None => providers.push(provider),
                Some(first) => {
                    for pr in &problems {
                        sink.warn(
                            pr.pos,
                            &pr.field,
                            format!(
                                "{}; as in Istio, extension provider \"{name}\" cannot be used, and requests to workloads whose CUSTOM policies name it are denied",
                                pr.message
                            ),
                        );
                    }
                    invalid.insert(name, first.message.clone());
                }
            }
            Some(())
        });
        m.extension_providers = providers;
        m.invalid_providers = invalid;
        let mut ignored = Vec::new();
        for key in NOT_ACTED_ON {
            if f.peek(key).is_some() {
                ignored.push(*key);
            }
            f.ignore(key);
        }
        if !ignored.is_empty() {
            sink.warn(
                f.pos(),
                path,
                format!(
                    "meshward does not act on these mesh settings: {}",
                    ignored.join(", ")
                ),
            );
        }
        f.finish_ignoring_unknown(sink, IGNORED_AS_IN_ISTIO);
        m
    }
}

/// Decodes `defaultConfig` (Istio's ProxyConfig): its
/// `terminationDrainDuration` (a duration such as `5s`, from `0s` to
/// [`MAX_TERMINATION_DRAIN_DURATION`], whole milliseconds; anything else
/// is an error that refuses the mesh config, as Istio refuses a value it
/// cannot read). Its other fields are named in one warning.
fn decode_default_config(
    sink: &mut Sink<'_>,
    node: &Node,
    path: &str,
) -> Option<std::time::Duration> {
    let mut f = Fields::new(sink, node, path);
    let key = "terminationDrainDuration";
    let pos = f.peek(key).map_or(f.pos(), |n| n.pos);
    let drain = f.string(sink, key).and_then(|t| {
        let checked = super::security::parse_duration(&t).and_then(|secs| {
            if secs == 0.0 {
                return Ok(std::time::Duration::ZERO);
            }
            super::security::check_duration(&t)?;
            let d = std::time::Duration::from_millis((secs * 1000.0).round() as u64);
            if d > MAX_TERMINATION_DRAIN_DURATION {
                Err(format!("drain duration \"{t}\" is too long: at most 1h"))
            } else {
                Ok(d)
            }
        });
        match checked {
            Ok(d) => Some(d),
            Err(e) => {
                sink.error(pos, &f.field_path(key), e);
                None
            }
        }
    });
    let others: Vec<String> = match &node.value {
        crate::yaml::Value::Map(entries) => entries
            .iter()
            .filter_map(|(k, _)| k.scalar_text())
            .filter(|k| *k != key)
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    };
    for k in &others {
        f.ignore(k);
    }
    if !others.is_empty() {
        sink.warn(
            f.pos(),
            path,
            format!(
                "meshward does not act on these defaultConfig settings: {}",
                others.join(", ")
            ),
        );
    }
    f.finish(sink);
    drain
}

/// Istio's `validateProviderName`: a DNS-1123 label.
fn check_provider_name(name: &str) -> Result<(), String> {
    let b = name.as_bytes();
    if b.is_empty() {
        return Err("extension provider name must not be empty".to_string());
    }
    let ok = b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        Err(format!(
            "extension provider name \"{name}\" is not valid (at most 63 lower-case letters, digits and '-', not starting or ending with '-')"
        ))
    }
}

fn decode_provider(
    sink: &mut Sink<'_>,
    node: &Node,
    path: &str,
    problems: &mut Vec<Problem>,
) -> Option<ExtensionProvider> {
    let mut f = Fields::new(sink, node, path);
    let name_pos = f.peek("name").map_or(node.pos, |n| n.pos);
    let name = f.string(sink, "name").unwrap_or_default();
    if let Err(message) = check_provider_name(&name) {
        problems.push(Problem {
            pos: name_pos,
            field: f.field_path("name"),
            message,
        });
    }
    let crate::yaml::Value::Map(entries) = &node.value else {
        f.finish(sink);
        return None;
    };
    let kinds: Vec<&str> = entries
        .iter()
        .filter_map(|(k, _)| k.scalar_text())
        .filter(|k| *k != "name")
        .collect();
    if kinds.len() > 1 {
        // Two members of one protobuf `oneof`: Istio cannot read the
        // mesh config at all.
        sink.error(
            node.pos,
            path,
            format!(
                "extension provider \"{name}\" must set exactly one provider type, found {}",
                kinds.len()
            ),
        );
        for k in &kinds {
            f.ignore(k);
        }
        f.finish(sink);
        return None;
    }
    let Some(kind) = kinds.first().map(|k| k.to_string()) else {
        // Istio skips a provider without a type; a policy naming it finds
        // no provider.
        problems.push(Problem {
            pos: node.pos,
            field: path.to_string(),
            message: format!("extension provider \"{name}\" sets no provider type"),
        });
        f.finish(sink);
        return Some(ExtensionProvider {
            name,
            kind: String::new(),
            service: None,
            port: None,
            settings: serde_json::Value::Null,
            authz: None,
        });
    };
    let body = f.take(&kind);
    let settings = body.map(Node::to_json).unwrap_or(serde_json::Value::Null);
    let (mut service, mut port, mut authz) = (None, None, None);
    if kind == "envoyExtAuthzHttp" || kind == "envoyExtAuthzGrpc" {
        let body_path = format!("{path}.{kind}");
        let at = |key: &str| {
            body.and_then(|b| b.get(key))
                .map_or(body.map_or(node.pos, |b| b.pos), |n| n.pos)
        };
        authz = body.map(|b| decode_ext_authz(sink, b, &body_path, &kind, problems));
        service = settings
            .get("service")
            .and_then(|s| s.as_str())
            .map(str::to_string);
        // Protobuf's JSON form also takes a number as a string.
        let number = settings
            .get("port")
            .and_then(|p| p.as_u64().or_else(|| p.as_str()?.parse().ok()));
        port = number
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p > 0);
        if service.as_deref().is_none_or(str::is_empty) {
            problems.push(Problem {
                pos: at("service"),
                field: format!("{body_path}.service"),
                message: "service is required".to_string(),
            });
        }
        if port.is_none() {
            problems.push(Problem {
                pos: at("port"),
                field: format!("{body_path}.port"),
                message: match number {
                    Some(n) => format!("port {n} is out of range (1-65535)"),
                    None => "port is required (1-65535)".to_string(),
                },
            });
        }
    }
    f.finish(sink);
    Some(ExtensionProvider {
        name,
        kind,
        service,
        port,
        settings,
        authz,
    })
}

/// Trust domains are DNS-like names (`cluster.local`, `example.org`).
pub fn check_trust_domain(td: &str) -> Result<(), String> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "\"{td}\" is not a valid trust domain (lower-case letters, digits, '.', '-', '_')"
        ))
    }
}
