//! Mesh-wide settings: the `meshConfig` block of Istio's mesh configuration.

use crate::decode::{self, Fields};
use crate::diag::Sink;
use crate::yaml::Node;

/// Istio MeshConfig fields that meshward accepts but does not act on, so an
/// existing mesh config loads (with one warning naming them).
const NOT_ACTED_ON: &[&str] = &[
    "accessLogFile",
    "accessLogFormat",
    "accessLogEncoding",
    "enableTracing",
    "enableEnvoyAccessLogService",
    "defaultConfig",
    "outboundTrafficPolicy",
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
    "connectTimeout",
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
    pub enable_auto_mtls: bool,
    pub path_normalization: PathNormalization,
    /// meshward extension: default workload certificate lifetime (Go duration).
    pub workload_cert_ttl: Option<String>,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            root_namespace: "istio-system".to_string(),
            trust_domain: "cluster.local".to_string(),
            trust_domain_aliases: Vec::new(),
            extension_providers: Vec::new(),
            enable_auto_mtls: true,
            path_normalization: PathNormalization::Base,
            workload_cert_ttl: None,
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
        if let Some(ns) = f.string(sink, "rootNamespace") {
            if let Err(e) = super::check_namespace(&ns) {
                sink.error(f.pos(), &f.field_path("rootNamespace"), e);
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
            pf.finish(sink);
        }
        m.workload_cert_ttl = f.string(sink, "workloadCertTtl");
        if let Some(ttl) = &m.workload_cert_ttl
            && let Err(e) = super::security::check_duration(ttl)
        {
            sink.error(f.pos(), &f.field_path("workloadCertTtl"), e);
        }
        let mut names = std::collections::BTreeSet::new();
        m.extension_providers = f
            .list(sink, "extensionProviders", |sink, n, p| {
                let provider = decode_provider(sink, n, p)?;
                if !names.insert(provider.name.clone()) {
                    sink.error(
                        n.pos,
                        &format!("{p}.name"),
                        format!(
                            "extension provider \"{}\" is defined more than once",
                            provider.name
                        ),
                    );
                }
                Some(provider)
            })
            .unwrap_or_default();
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
        f.finish(sink);
        m
    }
}

fn decode_provider(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<ExtensionProvider> {
    let mut f = Fields::new(sink, node, path);
    let name = f.string(sink, "name").unwrap_or_default();
    if name.is_empty() {
        sink.error(
            node.pos,
            &f.field_path("name"),
            "extension provider name must not be empty",
        );
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
    if kinds.len() != 1 {
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
    let kind = kinds[0].to_string();
    let body = f.take(&kind);
    let settings = body.map(Node::to_json).unwrap_or(serde_json::Value::Null);
    let (mut service, mut port) = (None, None);
    if kind == "envoyExtAuthzHttp" || kind == "envoyExtAuthzGrpc" {
        let body_path = format!("{path}.{kind}");
        service = settings
            .get("service")
            .and_then(|s| s.as_str())
            .map(str::to_string);
        port = settings
            .get("port")
            .and_then(|p| p.as_u64())
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p > 0);
        if service.as_deref().is_none_or(str::is_empty) {
            sink.error(
                node.pos,
                &format!("{body_path}.service"),
                "service is required",
            );
        }
        if port.is_none() {
            sink.error(
                node.pos,
                &format!("{body_path}.port"),
                "port is required (1-65535)",
            );
        }
    }
    f.finish(sink);
    Some(ExtensionProvider {
        name,
        kind,
        service,
        port,
        settings,
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
