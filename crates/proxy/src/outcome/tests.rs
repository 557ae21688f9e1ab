use super::*;

fn record() -> AccessRecord {
    AccessRecord {
        time: String::new(),
        kind: "http",
        reporter: "destination",
        src_addr: String::new(),
        src_identity: None,
        dst_addr: String::new(),
        dst_service: None,
        dst_identity: None,
        tls_mode: "none",
        method: None,
        path: None,
        authority: None,
        request_id: None,
        response_code: None,
        response_flags: Flag::None.as_str(),
        decision: "allow",
        reason: "allowed_by_policy".to_string(),
        policy: Some("ns/allow".to_string()),
        rule: Some(0),
        explanation: String::new(),
        duration_ms: 0.0,
        bytes_sent: 0,
        bytes_received: 0,
    }
}

#[test]
fn every_flag_has_envoys_label_and_parses_back() {
    let expected = [
        (Flag::None, "-"),
        (Flag::ExtAuthzDenied, "UAEX"),
        (Flag::UpstreamConnectFailure, "UF"),
        (Flag::NoHealthyUpstream, "UH"),
        (Flag::NoRoute, "NR"),
        (Flag::DownstreamTermination, "DC"),
        (Flag::UpstreamTermination, "UC"),
        (Flag::UpstreamTimeout, "UT"),
        (Flag::DownstreamProtocolError, "DPE"),
        (Flag::UpstreamProtocolError, "UPE"),
    ];
    assert_eq!(expected.len(), Flag::ALL.len());
    for (flag, label) in expected {
        assert_eq!(flag.as_str(), label);
        assert_eq!(flag.to_string(), label);
    }
    // No two flags share a label.
    for a in Flag::ALL {
        assert_eq!(
            Flag::ALL
                .iter()
                .filter(|b| b.as_str() == a.as_str())
                .count(),
            1
        );
    }
}

#[test]
fn local_failures_keep_their_status_flag_and_body() {
    let table = [
        (
            LocalFailure::ConnectFailed,
            503,
            "UF",
            "upstream connect error",
        ),
        (
            LocalFailure::Reset,
            503,
            "UC",
            "upstream connect error or disconnect/reset before headers",
        ),
        (LocalFailure::DownstreamBroke, 400, "DC", ""),
        (LocalFailure::BadBody, 400, "DPE", "bad request body"),
        (
            LocalFailure::BadResponse,
            502,
            "UPE",
            "upstream sent an invalid response",
        ),
        (LocalFailure::Timeout, 504, "UT", "upstream request timeout"),
        // The outbound side's.
        (LocalFailure::NoRoute, 404, "NR", "no healthy upstream"),
        (
            LocalFailure::NoHealthyUpstream,
            503,
            "UH",
            "no healthy upstream",
        ),
        (LocalFailure::UnusableTls, 503, "NR", "no healthy upstream"),
        (
            LocalFailure::BodyTooLarge,
            413,
            "DPE",
            "request body too large",
        ),
        (LocalFailure::LengthRequired, 411, "DPE", "length required"),
        (LocalFailure::BadMethod, 400, "DPE", "bad request method"),
        (LocalFailure::BadPath, 400, "DPE", "bad request path"),
        (LocalFailure::BadH2Path, 400, "-", "bad request path"),
    ];
    assert_eq!(table.len(), LocalFailure::ALL.len());
    for (failure, status, flag, body) in table {
        assert_eq!(
            (failure.status(), failure.flag().as_str(), failure.body()),
            (status, flag, body),
            "{failure:?}"
        );
    }
}

#[test]
fn outbound_reasons_without_an_error_are_the_ones_logged_before() {
    let fixed = [
        (
            LocalFailure::DownstreamBroke,
            "downstream closed in the request body",
        ),
        (
            LocalFailure::BodyTooLarge,
            "request body too large for an HTTP/2 upstream",
        ),
        (
            LocalFailure::LengthRequired,
            "chunked request body to an HTTP/2 upstream",
        ),
        (LocalFailure::BadMethod, "invalid method"),
        (LocalFailure::BadPath, "bad request path"),
        (LocalFailure::BadH2Path, "bad path"),
    ];
    for (failure, reason) in fixed {
        assert_eq!(failure.reason(), reason, "{failure:?}");
    }
    // The others log their error; without one, their body.
    for failure in LocalFailure::ALL {
        if !fixed.iter().any(|(f, _)| *f == failure) {
            assert_eq!(failure.reason(), failure.body(), "{failure:?}");
        }
    }
    // Outbound, the flag decides the access log's decision.
    assert_eq!(Decision::carried(Flag::None).as_str(), "allow");
    for flag in Flag::ALL.into_iter().filter(|f| *f != Flag::None) {
        assert_eq!(Decision::carried(flag).as_str(), "error", "{flag}");
    }
    assert_eq!(FORWARDED, "forwarded");
    assert_eq!(DOWNSTREAM_CLOSED, "downstream closed");
}

#[test]
fn refusals_give_status_flag_body_and_log_fields() {
    let unauthenticated = Refusal::Unauthenticated {
        message: "Jwt is expired",
        policy: Some("ns/jwt".to_string()),
    };
    let ext = Refusal::ExtAuthz {
        status: 302,
        words: "ext_authz oauth: denied (302)".to_string(),
        policy: "ns/custom".to_string(),
        rule: 2,
    };
    let table: [(&Refusal, u16, &str, Option<&str>); 5] = [
        (
            &Refusal::InvalidPath,
            400,
            "-",
            Some("invalid request path"),
        ),
        (&unauthenticated, 401, "-", Some("Jwt is expired")),
        (&ext, 302, "UAEX", None),
        (&Refusal::Rbac, 403, "-", Some("RBAC: access denied")),
        (
            &Refusal::UpgradeRefused,
            403,
            "-",
            Some("upgrade refused: only websocket upgrades are proxied"),
        ),
    ];
    for (r, status, flag, body) in table {
        assert_eq!(
            (r.status(), r.flag().as_str(), r.body()),
            (status, flag, body)
        );
    }

    // The decision's words stay for a bad path and an RBAC deny.
    for r in [Refusal::InvalidPath, Refusal::Rbac] {
        let mut rec = record();
        r.log(&mut rec);
        assert_eq!(
            (rec.decision, rec.reason.as_str()),
            ("allow", "allowed_by_policy")
        );
    }
    let mut rec = record();
    unauthenticated.log(&mut rec);
    assert_eq!(rec.decision, "deny");
    assert_eq!(rec.reason, "RequestAuthentication: Jwt is expired");
    assert_eq!((rec.policy.as_deref(), rec.rule), (Some("ns/jwt"), None));
    let mut rec = record();
    ext.log(&mut rec);
    assert_eq!(rec.decision, "deny");
    assert_eq!(rec.reason, "ext_authz oauth: denied (302)");
    assert_eq!(
        (rec.policy.as_deref(), rec.rule),
        (Some("ns/custom"), Some(2))
    );
    let mut rec = record();
    Refusal::UpgradeRefused.log(&mut rec);
    assert_eq!(rec.decision, "allow");
    assert_eq!(rec.reason, Refusal::UPGRADE_REFUSED);
}

#[test]
fn request_ends_set_the_flag_and_the_reason() {
    let mut rec = record();
    RequestEnd::Unreachable("application at 127.0.0.1:1 unreachable".into()).log(&mut rec);
    assert_eq!(rec.response_flags, "UF");
    assert_eq!(
        rec.reason,
        "allowed_by_policy; application at 127.0.0.1:1 unreachable"
    );

    let mut rec = record();
    RequestEnd::Tunnel {
        flag: Flag::None,
        reason: Close::policy_changed("WebSocket"),
    }
    .log(&mut rec);
    assert_eq!((rec.decision, rec.response_flags), ("deny", "-"));
    assert_eq!(
        rec.reason,
        "policy_changed: the new policy denies this WebSocket"
    );

    // Any other tunnel end keeps the decision's words.
    let mut rec = record();
    RequestEnd::Tunnel {
        flag: Flag::DownstreamTermination,
        reason: "tunnel broke off: reset".into(),
    }
    .log(&mut rec);
    assert_eq!((rec.decision, rec.response_flags), ("allow", "DC"));
    assert_eq!(rec.reason, "allowed_by_policy");

    let mut rec = record();
    RequestEnd::Refused(Refusal::ExtAuthz {
        status: 403,
        words: "w".into(),
        policy: "p".into(),
        rule: 0,
    })
    .log(&mut rec);
    assert_eq!(rec.response_flags, "UAEX");
    assert_eq!(
        RequestEnd::Exchanged(Flag::UpstreamProtocolError)
            .flag()
            .as_str(),
        "UPE"
    );
}

#[test]
fn connection_refusals_are_uaex_with_their_reason() {
    let labels: Vec<_> = ConnRefusal::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(
        labels,
        [
            "plaintext_rejected",
            "tls_error",
            "tls_timeout",
            "tls_handshake_failed",
            "no_peer_identity"
        ]
    );
    assert!(
        ConnRefusal::ALL
            .iter()
            .all(|r| r.flag() == Flag::ExtAuthzDenied)
    );
}

#[test]
fn close_reasons_round_trip_through_the_logged_reason() {
    let idle = Close::idle(Duration::from_secs(5));
    assert_eq!(idle, "idle_timeout: no bytes either way for 5s");
    assert_eq!(Close::of(&idle), Some(Close::IdleTimeout));
    let changed = Close::policy_changed("connection");
    assert_eq!(
        changed,
        "policy_changed: the new policy denies this connection"
    );
    assert_eq!(Close::of(&changed), Some(Close::PolicyChanged));
    assert_eq!(Close::of("connection error: reset"), None);
    assert_eq!(crate::idle::idle_reason(Duration::from_secs(5)), idle);
}

#[test]
fn tcp_ends_give_envoys_flags() {
    let idle = TcpEnd::Closed(Close::IdleTimeout, Close::idle(Duration::from_secs(1)));
    let changed = TcpEnd::Closed(Close::PolicyChanged, Close::policy_changed("connection"));
    let failed = TcpEnd::Failed("connection error: reset".into());
    let table = [
        (&TcpEnd::Done, "-", "allow"),
        (&idle, "-", "allow"),
        // As before the outcome types: a close by policy change is UF.
        (&changed, "UF", "deny"),
        (&failed, "UF", "allow"),
    ];
    for (end, flag, decision) in table {
        let mut rec = record();
        end.log(&mut rec);
        assert_eq!(
            (rec.response_flags, rec.decision),
            (flag, decision),
            "{end:?}"
        );
    }
}

#[test]
fn ext_authz_words() {
    let w = ExtAuthzWords("oauth");
    assert_eq!(w.allowed(), "ext_authz oauth: allowed");
    assert_eq!(w.denied(Some(302)), "ext_authz oauth: denied (302)");
    assert_eq!(w.denied(None), "ext_authz oauth: denied");
    assert_eq!(w.failed("down", true), "ext_authz oauth: down (failOpen)");
    assert_eq!(w.failed("down", false), "ext_authz oauth: down");
}
