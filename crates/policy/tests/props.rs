//! Property tests: matchers agree with naive reference implementations,
//! path normalization is total and leaves no dot segments, and the YAML
//! loader never panics.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use meshward_config::{Loader, PathNormalization};
use meshward_policy::matcher::{Glob, StrMatch, ip_block, ip_in, namespace_glob};
use meshward_policy::normalize_path;
use proptest::prelude::*;
use proptest::sample::select;

// ------------------------------------------------------------------ references

/// Istio's string forms, written out with char iteration only.
fn str_match_reference(pattern: &str, value: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let v: Vec<char> = value.chars().collect();
    if pattern == "*" {
        return !v.is_empty();
    }
    if p.first() == Some(&'*') {
        let s = &p[1..];
        return v.len() >= s.len() && v[v.len() - s.len()..] == *s;
    }
    if p.last() == Some(&'*') {
        let s = &p[..p.len() - 1];
        return v.len() >= s.len() && v[..s.len()] == *s;
    }
    p == v
}

/// Full-match wildcard: `*` in `pattern` is any run of characters.
fn wildcard_reference(pattern: &[char], value: &[char]) -> bool {
    // dp[j]: pattern[..i] matches value[..j]
    let mut dp = vec![false; value.len() + 1];
    dp[0] = true;
    for &pc in pattern {
        let mut next = vec![false; value.len() + 1];
        if pc == '*' {
            let mut any = false;
            for j in 0..=value.len() {
                any |= dp[j];
                next[j] = any;
            }
        } else {
            for j in 1..=value.len() {
                next[j] = dp[j - 1] && value[j - 1] == pc;
            }
        }
        dp = next;
    }
    dp[value.len()]
}

/// Istio's namespace regex `.*/ns/<value, * as .*>/.*`, as a wildcard.
fn namespace_reference(namespace: &str, principal: &str) -> bool {
    let pattern: Vec<char> = format!("*/ns/{namespace}/*").chars().collect();
    let value: Vec<char> = principal.chars().collect();
    wildcard_reference(&pattern, &value)
}

fn mask32(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

fn mask128(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    }
}

// ------------------------------------------------------------------ strategies

fn small_text() -> impl Strategy<Value = String> {
    prop::collection::vec(select(vec!["a", "b", "ab", "/", ".", "*", "A", "é"]), 0..8)
        .prop_map(|v| v.concat())
}

fn pattern() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("*".to_string()),
        small_text().prop_map(|s| s.replace('*', "")),
        small_text().prop_map(|s| format!("{}*", s.replace('*', ""))),
        small_text().prop_map(|s| format!("*{}", s.replace('*', ""))),
        small_text(),
    ]
}

fn host_like() -> impl Strategy<Value = String> {
    prop::collection::vec(
        select(vec!["a", "B", "c", "Z", ".", "-", "é", "K", ":8080", "ß"]),
        0..10,
    )
    .prop_map(|v| v.concat())
}

fn ns_segment() -> impl Strategy<Value = String> {
    prop::collection::vec(select(vec!["a", "b", "-", ".", "x"]), 0..5).prop_map(|v| v.concat())
}

fn ns_pattern() -> impl Strategy<Value = String> {
    prop::collection::vec(select(vec!["a", "b", "-", ".", "*", "/", "ns"]), 0..6)
        .prop_map(|v| v.concat())
}

fn principal() -> impl Strategy<Value = String> {
    prop_oneof![
        (ns_segment(), ns_segment(), ns_segment())
            .prop_map(|(td, ns, sa)| format!("{td}/ns/{ns}/sa/{sa}")),
        prop::collection::vec(
            select(vec!["a", "b", "/", "ns", "/ns/", "-", ".", "sa"]),
            0..10
        )
        .prop_map(|v| v.concat()),
    ]
}

fn path_tokens() -> impl Strategy<Value = String> {
    // Complete escapes only: decoding one never creates another.
    prop::collection::vec(
        select(vec![
            "/",
            "//",
            ".",
            "..",
            "a",
            "b",
            "%2E",
            "%2e",
            "%2F",
            "%2f",
            "%5C",
            "%5c",
            "%41",
            "%7E",
            "%25",
            "%20",
            "%E2%82%AC",
            "\\",
            "?",
            "#",
            ";",
            "~",
            "é",
        ]),
        0..16,
    )
    .prop_map(|v| v.concat())
}

fn yaml_tokens() -> impl Strategy<Value = String> {
    prop::collection::vec(
        select(vec![
            "a",
            "key",
            ": ",
            ":",
            " ",
            "  ",
            "\n",
            "- ",
            "-",
            "[",
            "]",
            "{",
            "}",
            ",",
            "&x ",
            "*x",
            "!!str ",
            "!!int ",
            "!t ",
            "'",
            "\"",
            "---\n",
            "...\n",
            "# c",
            "? ",
            "|\n",
            ">\n",
            "\t",
            "8080",
            "~",
            "true",
            "%YAML 1.2\n",
            "\\",
            "é",
        ]),
        0..40,
    )
    .prop_map(|v| v.concat())
}

const MODES: [PathNormalization; 4] = [
    PathNormalization::None,
    PathNormalization::Base,
    PathNormalization::MergeSlashes,
    PathNormalization::DecodeAndMergeSlashes,
];

fn has_dot_segment(path: &str) -> bool {
    path.contains("/../") || path.contains("/./") || path.ends_with("/..") || path.ends_with("/.")
}

// ------------------------------------------------------------------ properties

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn str_match_agrees_with_reference(p in pattern(), v in small_text()) {
        prop_assert_eq!(StrMatch::new(&p).matches(&v), str_match_reference(&p, &v), "pattern {:?} value {:?}", p, v);
    }

    #[test]
    fn str_match_forms_hold(stem in small_text(), rest in small_text()) {
        let stem = stem.replace('*', "");
        // `*` alone is the presence form, not an empty prefix or suffix.
        prop_assume!(!stem.is_empty());
        let joined = format!("{stem}{rest}");
        let prefix = format!("{stem}*");
        prop_assert!(StrMatch::new(&prefix).matches(&joined));
        let joined = format!("{rest}{stem}");
        let suffix = format!("*{stem}");
        prop_assert!(StrMatch::new(&suffix).matches(&joined));
        prop_assert!(StrMatch::new(&stem).matches(&stem));
        prop_assert_eq!(StrMatch::new("*").matches(&rest), !rest.is_empty());
    }

    #[test]
    fn host_matching_ignores_ascii_case(p in prop_oneof![host_like(), host_like().prop_map(|h| format!("*{h}")), host_like().prop_map(|h| format!("{h}*"))],
                                        v in host_like()) {
        let m = StrMatch::new_ignore_case(&p);
        let reference = StrMatch::new(&p.to_ascii_lowercase()).matches(&v.to_ascii_lowercase());
        prop_assert_eq!(m.matches_ignore_case(&v), reference, "pattern {:?} host {:?}", p, v);
        // Changing the case of the host never changes the answer.
        prop_assert_eq!(m.matches_ignore_case(&v.to_ascii_uppercase()), m.matches_ignore_case(&v));
    }

    #[test]
    fn cidr_v4_agrees_with_masking(addr: u32, ip: u32, len in 0u8..=32) {
        let net = ip_block(&format!("{}/{len}", Ipv4Addr::from(addr))).unwrap();
        let expected = addr & mask32(len) == ip & mask32(len);
        prop_assert_eq!(ip_in(&net, IpAddr::V4(Ipv4Addr::from(ip))), expected);
        // The same client seen through a dual-stack socket.
        prop_assert_eq!(ip_in(&net, IpAddr::V6(Ipv4Addr::from(ip).to_ipv6_mapped())), expected);
    }

    #[test]
    fn cidr_v4_bare_address_is_a_host_block(addr: u32, ip: u32) {
        let net = ip_block(&Ipv4Addr::from(addr).to_string()).unwrap();
        prop_assert_eq!(ip_in(&net, IpAddr::V4(Ipv4Addr::from(ip))), addr == ip);
        prop_assert!(ip_in(&net, IpAddr::V4(Ipv4Addr::from(addr))));
    }

    #[test]
    fn cidr_v6_agrees_with_masking(addr: u128, ip: u128, len in 0u8..=128, near in any::<bool>()) {
        // Often share a prefix so that matches are common.
        let ip = if near { (addr & mask128(len / 2 + 64).min(mask128(len))) | (ip & !mask128(len)) } else { ip };
        let ip6 = Ipv6Addr::from(ip);
        // IPv4-mapped addresses are compared as IPv4 (see ip_in), so the
        // u128 reference does not apply to them.
        prop_assume!(ip6.to_ipv4_mapped().is_none());
        let net = ip_block(&format!("{}/{len}", Ipv6Addr::from(addr))).unwrap();
        let expected = addr & mask128(len) == ip & mask128(len);
        prop_assert_eq!(ip_in(&net, IpAddr::V6(ip6)), expected, "{}/{} vs {}", Ipv6Addr::from(addr), len, ip6);
    }

    #[test]
    fn families_never_cross(v4: u32, v6: u128, len4 in 0u8..=32, len6 in 0u8..=128) {
        let ip6 = Ipv6Addr::from(v6);
        prop_assume!(ip6.to_ipv4_mapped().is_none());
        let net4 = ip_block(&format!("{}/{len4}", Ipv4Addr::from(v4))).unwrap();
        let net6 = ip_block(&format!("{ip6}/{len6}")).unwrap();
        prop_assert!(!ip_in(&net4, IpAddr::V6(ip6)));
        prop_assert!(!ip_in(&net6, IpAddr::V4(Ipv4Addr::from(v4))));
    }

    #[test]
    fn namespace_glob_agrees_with_reference(ns in ns_pattern(), p in principal()) {
        prop_assert_eq!(namespace_glob(&ns).matches(&p), namespace_reference(&ns, &p), "namespace {:?} principal {:?}", ns, p);
    }

    #[test]
    fn namespace_glob_matches_its_own_namespace(td in ns_segment(), ns in ns_segment(), sa in ns_segment(), other in ns_segment()) {
        let principal = format!("{td}/ns/{ns}/sa/{sa}");
        prop_assert!(namespace_glob(&ns).matches(&principal));
        prop_assert!(namespace_glob("*").matches(&principal));
        // Another literal namespace matches only if it is the same text or
        // the principal happens to contain `/ns/<other>/` elsewhere.
        if other != ns && !principal.contains(&format!("/ns/{other}/")) {
            prop_assert!(!namespace_glob(&other).matches(&principal));
        }
    }

    #[test]
    fn glob_star_agrees_with_wildcard_reference(p in ns_pattern(), v in principal()) {
        let pc: Vec<char> = p.chars().collect();
        let vc: Vec<char> = v.chars().collect();
        prop_assert_eq!(Glob::star(&p).matches(&v), wildcard_reference(&pc, &vc), "glob {:?} value {:?}", p, v);
    }

    #[test]
    fn normalize_never_panics(raw in any::<String>()) {
        for mode in MODES {
            let _ = normalize_path(&raw, mode);
        }
    }

    #[test]
    fn normalize_never_panics_on_path_like_input(raw in path_tokens(), junk in "[%0-9a-fA-F./\\\\]{0,12}") {
        for mode in MODES {
            let _ = normalize_path(&raw, mode);
            let _ = normalize_path(&format!("{raw}{junk}"), mode);
        }
    }

    #[test]
    fn normalized_paths_have_no_dot_segments(raw in prop_oneof![path_tokens(), any::<String>()]) {
        for mode in [PathNormalization::Base, PathNormalization::MergeSlashes, PathNormalization::DecodeAndMergeSlashes] {
            if let Ok(out) = normalize_path(&raw, mode) {
                prop_assert!(!has_dot_segment(&out), "{:?} {:?} -> {:?}", mode, raw, out);
                prop_assert!(!out.contains('?') && !out.contains('#'), "{:?} -> {:?}", raw, out);
            }
        }
    }

    #[test]
    fn base_normalization_is_idempotent(raw in path_tokens()) {
        if let Ok(once) = normalize_path(&raw, PathNormalization::Base) {
            let twice = normalize_path(&once, PathNormalization::Base).unwrap();
            prop_assert_eq!(&*twice, &*once, "input {:?}", raw);
        }
    }

    #[test]
    fn base_normalization_is_idempotent_without_escapes(raw in any::<String>()) {
        let raw = raw.replace('%', "");
        let once = normalize_path(&raw, PathNormalization::Base).unwrap();
        let twice = normalize_path(&once, PathNormalization::Base).unwrap();
        prop_assert_eq!(&*twice, &*once, "input {:?}", raw);
    }

    #[test]
    fn none_only_strips_query_and_fragment(raw in any::<String>()) {
        let out = normalize_path(&raw, PathNormalization::None).unwrap();
        let cut = raw.find(['?', '#']).unwrap_or(raw.len());
        prop_assert_eq!(&*out, &raw[..cut]);
    }

    #[test]
    fn only_encoded_nul_is_refused(raw in path_tokens()) {
        for mode in [PathNormalization::Base, PathNormalization::MergeSlashes, PathNormalization::DecodeAndMergeSlashes] {
            prop_assert!(normalize_path(&raw, mode).is_ok());
            let with_nul = format!("/x%00{raw}");
            prop_assert!(normalize_path(&with_nul, mode).is_err());
        }
    }

    #[test]
    fn yaml_parse_never_panics(text in any::<String>()) {
        let _ = meshward_config::yaml::parse_stream(&text);
        let _ = meshward_config::yaml::parse_one(&text);
    }

    #[test]
    fn yaml_parse_never_panics_on_yaml_like_input(text in yaml_tokens()) {
        let _ = meshward_config::yaml::parse_stream(&text);
    }

    #[test]
    fn loader_never_panics(text in prop_oneof![any::<String>(), yaml_tokens()]) {
        let mut l = Loader::new();
        l.add_source("fuzz.yaml", &text);
        l.add_mesh_config_source("mesh.yaml", &text);
        let _ = l.finish();
    }

    #[test]
    fn loader_never_panics_inside_resources(
        kind in select(vec![
            ("security.istio.io/v1", "AuthorizationPolicy"),
            ("security.istio.io/v1", "PeerAuthentication"),
            ("security.istio.io/v1", "RequestAuthentication"),
            ("networking.istio.io/v1", "DestinationRule"),
            ("networking.istio.io/v1", "ServiceEntry"),
            ("networking.istio.io/v1", "WorkloadEntry"),
            ("meshward.io/v1alpha1", "MeshConfig"),
        ]),
        field in select(vec![
            "rules", "action", "selector", "mtls", "portLevelMtls", "jwtRules", "trafficPolicy", "hosts", "ports",
            "endpoints", "address", "extensionProviders", "pathNormalization", "targetRefs", "provider",
        ]),
        body in yaml_tokens(),
    ) {
        let indented: String = body.lines().map(|l| format!("    {l}\n")).collect();
        let text = format!(
            "apiVersion: {}\nkind: {}\nmetadata:\n  name: p\nspec:\n  {field}:\n{indented}",
            kind.0, kind.1
        );
        let mut l = Loader::new();
        l.add_source("fuzz.yaml", &text);
        if let Err(d) = l.finish() {
            // Every error names the file and renders.
            for e in d.errors() {
                prop_assert!(e.to_string().starts_with("fuzz.yaml:"));
            }
        }
    }
}

/// Percent escapes are decoded once, as Envoy does: an escape assembled from
/// a literal `%` and a decoded character survives one pass and is decoded
/// by the next. This is why BASE idempotence holds only for inputs whose
/// escapes are complete (see `base_normalization_is_idempotent`).
#[test]
fn normalization_decodes_escapes_once() {
    let once = normalize_path("/%%32E%%32E/admin", PathNormalization::Base).unwrap();
    assert_eq!(once, "/%2E%2E/admin");
    assert_eq!(
        normalize_path(&once, PathNormalization::Base).unwrap(),
        "/admin"
    );
}
