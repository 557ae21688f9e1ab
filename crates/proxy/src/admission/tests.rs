//! The verdicts of the pure part of admission, where the HTTP/1.1 and the
//! hyper path used to decide in code of their own.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};
use meshward_config::model::security::Action;
use meshward_policy::{ExtAuthzCheck, PathError, PolicyRef, Reason, RuleRef, Verdict as Policy};

use super::*;
use crate::h1::codec::RequestHead;

struct NoHeaders;

impl meshward_policy::Headers for NoHeaders {
    fn header(&self, _: &str) -> Option<Cow<'_, [u8]>> {
        None
    }
}

impl RequestHeaders for NoHeaders {
    fn fields(&self) -> Vec<(&str, &[u8])> {
        Vec::new()
    }
}

fn request(unsupported_upgrade: bool) -> HttpRequest<'static, 'static, NoHeaders> {
    HttpRequest {
        method: "GET",
        path: "/a/../b",
        host: "svc",
        headers: &NoHeaders,
        protocol: "HTTP/1.1",
        unsupported_upgrade,
    }
}

fn rule(action: Action) -> RuleRef {
    RuleRef {
        policy: Arc::new(PolicyRef {
            namespace: "ns".into(),
            name: "p".into(),
            action,
            dry_run: false,
        }),
        rule: 1,
    }
}

fn decision(allow: bool, custom: bool) -> Decision {
    Decision {
        verdict: if allow { Policy::Allow } else { Policy::Deny },
        reason: if allow {
            Reason::AllowMatched
        } else {
            Reason::DenyMatched
        },
        decided_by: Some(rule(if allow { Action::Allow } else { Action::Deny })),
        ext_authz: custom.then(|| ExtAuthzCheck {
            provider: "authz".into(),
            policy: rule(Action::Custom),
        }),
        audit: Vec::new(),
        dry_run: Vec::new(),
    }
}

fn field(n: &'static str, v: &'static str) -> (HeaderName, HeaderValue) {
    (HeaderName::from_static(n), HeaderValue::from_static(v))
}

fn rejected() -> jwt::Rejected {
    jwt::Rejected {
        message: "Jwt is expired",
        policy: Some("ns/jwt".into()),
    }
}

#[test]
fn a_bad_path_is_400_even_with_a_bad_token() {
    // The hyper path used to log this as a RequestAuthentication deny; the
    // status was 400 on both paths, and the path is what Envoy refuses
    // first (normalization runs before any filter).
    let v = decide_http(
        &request(false),
        Err(rejected()),
        None,
        Err(PathError::EncodedNul),
        None,
    );
    let Verdict::Refused(r) = v else {
        panic!("admitted")
    };
    assert_eq!(r.outcome, Refusal::InvalidPath);
    assert_eq!(r.outcome.status(), 400);
    assert!(r.decision.is_none());
}

#[test]
fn a_bad_token_is_401_with_the_challenge() {
    let v = decide_http(
        &request(false),
        Err(rejected()),
        None,
        Ok(Cow::Borrowed("/b")),
        None,
    );
    let Verdict::Refused(r) = v else {
        panic!("admitted")
    };
    assert_eq!(r.outcome.status(), 401);
    let Reply::Local { body, challenge } = r.reply else {
        panic!("provider reply")
    };
    assert_eq!(body, "Jwt is expired");
    assert!(challenge.is_some_and(|c| c.starts_with("Bearer")));
}

#[test]
fn a_refusing_provider_answers_with_its_own_response() {
    let deny = ext_authz::Outcome::Deny {
        status: 302,
        headers: vec![field("location", "https://login")],
        body: Bytes::from_static(b"go"),
    };
    let v = decide_http(
        &request(false),
        Ok(jwt::Authenticated::default()),
        Some(decision(true, true)),
        Ok(Cow::Borrowed("/b")),
        Some(deny),
    );
    let Verdict::Refused(r) = v else {
        panic!("admitted")
    };
    assert_eq!(
        (r.outcome.status(), r.outcome.flag()),
        (302, Flag::ExtAuthzDenied)
    );
    assert!(r.ext_allowed.is_none());
    let Reply::Provider { fields, body } = r.reply else {
        panic!("local reply")
    };
    assert_eq!((fields.len(), &body[..]), (1, &b"go"[..]));
    let Refusal::ExtAuthz {
        words,
        policy,
        rule,
        ..
    } = r.outcome
    else {
        panic!("not ext_authz")
    };
    assert_eq!(words, "ext_authz authz: denied (302)");
    assert_eq!((policy.as_str(), rule), ("ns/p", 1));

    // Failing closed: its status, nothing else.
    let failed = ext_authz::Outcome::Failed {
        reason: "timeout".into(),
        allow: false,
        status: 403,
    };
    let v = decide_http(
        &request(false),
        Ok(jwt::Authenticated::default()),
        Some(decision(true, true)),
        Ok(Cow::Borrowed("/b")),
        Some(failed),
    );
    let Verdict::Refused(r) = v else {
        panic!("admitted")
    };
    assert_eq!(r.outcome.status(), 403);
    assert!(
        matches!(r.reply, Reply::Provider { ref fields, ref body } if fields.is_empty() && body.is_empty())
    );
}

#[test]
fn an_rbac_deny_after_an_allowing_provider_keeps_its_words() {
    let allow = ext_authz::Outcome::Allow {
        remove: Vec::new(),
        set: Vec::new(),
        append: Vec::new(),
        downstream: Vec::new(),
    };
    let v = decide_http(
        &request(true),
        Ok(jwt::Authenticated::default()),
        Some(decision(false, true)),
        Ok(Cow::Borrowed("/b")),
        Some(allow),
    );
    let Verdict::Refused(r) = v else {
        panic!("admitted")
    };
    // RBAC before the upgrade check.
    assert_eq!(r.outcome, Refusal::Rbac);
    assert_eq!(r.ext_allowed.as_deref(), Some("ext_authz authz: allowed"));
    assert!(matches!(
        r.reply,
        Reply::Local {
            body: "RBAC: access denied",
            challenge: None
        }
    ));
}

#[test]
fn an_unsupported_upgrade_is_refused_only_when_allowed() {
    let v = decide_http(
        &request(true),
        Ok(jwt::Authenticated::default()),
        Some(decision(true, false)),
        Ok(Cow::Borrowed("/b")),
        None,
    );
    let Verdict::Refused(r) = v else {
        panic!("admitted")
    };
    assert_eq!(r.outcome, Refusal::UpgradeRefused);
    assert!(r.decision.is_some_and(|d| d.is_allowed()));
}

#[test]
fn no_decision_for_a_good_token_fails_closed() {
    let v = decide_http(
        &request(false),
        Ok(jwt::Authenticated::default()),
        None,
        Ok(Cow::Borrowed("/b")),
        None,
    );
    assert!(matches!(
        v,
        Verdict::Refused(Refused {
            outcome: Refusal::Rbac,
            ..
        })
    ));
}

#[test]
fn an_admitted_request_carries_one_set_of_header_edits_for_both_paths() {
    let authn = jwt::Authenticated {
        auth: None,
        remove: vec!["authorization".into(), "x-jwt".into()],
        add: vec![("x-jwt".into(), "payload".into())],
    };
    let allow = ext_authz::Outcome::Allow {
        remove: vec![HeaderName::from_static("x-gone")],
        set: vec![field("x-set", "s")],
        append: vec![field("x-add", "a")],
        downstream: vec![field("x-down", "d")],
    };
    let v = decide_http(
        &request(false),
        Ok(authn),
        Some(decision(true, true)),
        Ok(Cow::Borrowed("/b")),
        Some(allow),
    );
    let Verdict::Admitted(a) = v else {
        panic!("refused")
    };
    assert_eq!(a.forward, "/b");
    let edits = a.edits.expect("edits");
    assert_eq!(edits.remove, ["authorization", "x-jwt", "x-gone", "x-set"]);
    assert_eq!(
        edits.add,
        [
            ("x-jwt".to_string(), "payload".to_string()),
            ("x-set".to_string(), "s".to_string()),
            ("x-add".to_string(), "a".to_string()),
        ]
    );
    let ext = a.ext.expect("approval");
    assert_eq!(ext.provider, "authz");
    assert_eq!(ext.words, "ext_authz authz: allowed");
    assert_eq!(ext.downstream.len(), 1);
}

#[test]
fn a_plain_admitted_request_has_no_edits() {
    let v = decide_http(
        &request(false),
        Ok(jwt::Authenticated::default()),
        Some(decision(true, false)),
        Ok(Cow::Borrowed("/b")),
        None,
    );
    let Verdict::Admitted(a) = v else {
        panic!("refused")
    };
    assert!(a.edits.is_none() && a.ext.is_none() && a.auth.is_none());
}

#[test]
fn both_header_representations_read_alike() {
    let raw = "GET / HTTP/1.1\r\nHost: svc\r\nX-A: 1\r\nx-a: 2\r\nX-B: 3\r\n\r\n";
    let head = RequestHead::parse(&mut bytes::BytesMut::from(raw))
        .expect("valid")
        .expect("complete");
    let mut map = HeaderMap::new();
    for (n, v) in [("host", "svc"), ("x-a", "1"), ("x-a", "2"), ("x-b", "3")] {
        map.append(HeaderName::from_static(n), HeaderValue::from_static(v));
    }
    let h1 = crate::h1::HeaderView(&head);
    let hyper = crate::http::HeaderView(&map);
    use meshward_policy::Headers as _;
    for name in ["host", "x-a", "x-b", "x-c"] {
        assert_eq!(h1.header(name), hyper.header(name), "{name}");
    }
    let lower = |v: Vec<(&str, &[u8])>| -> Vec<(String, Vec<u8>)> {
        v.into_iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), v.to_vec()))
            .collect()
    };
    assert_eq!(lower(h1.fields()), lower(hyper.fields()));
}

#[test]
fn tcp_refusals() {
    let deny = ext_authz::Outcome::Deny {
        status: 403,
        headers: Vec::new(),
        body: Bytes::new(),
    };
    let TcpVerdict::Refused { outcome, .. } = decide_tcp(decision(true, true), Some(deny)) else {
        panic!("admitted")
    };
    // A connection has no status to tell.
    assert!(
        matches!(&outcome, Refusal::ExtAuthz { words, .. } if words == "ext_authz authz: denied")
    );
    assert_eq!(outcome.flag(), Flag::ExtAuthzDenied);

    let allow = ext_authz::Outcome::Allow {
        remove: Vec::new(),
        set: Vec::new(),
        append: Vec::new(),
        downstream: Vec::new(),
    };
    let TcpVerdict::Refused {
        outcome,
        ext_allowed,
        ..
    } = decide_tcp(decision(false, true), Some(allow))
    else {
        panic!("admitted")
    };
    assert_eq!(
        (outcome, ext_allowed.as_deref()),
        (Refusal::Rbac, Some("ext_authz authz: allowed"))
    );

    let TcpVerdict::Admitted { ext, .. } = decide_tcp(decision(true, false), None) else {
        panic!("refused")
    };
    assert!(ext.is_none());
}
