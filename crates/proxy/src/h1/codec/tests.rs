use super::*;

fn req(s: &[u8]) -> Result<Option<RequestHead>, HeadError> {
    RequestHead::parse(&mut BytesMut::from(s))
}

fn req_ok(s: &[u8]) -> RequestHead {
    req(s).expect("valid").expect("complete")
}

fn req_err(s: &[u8]) -> HeadError {
    req(s).expect_err("must be refused")
}

fn res(s: &[u8]) -> Result<Option<ResponseHead>, HeadError> {
    ResponseHead::parse(&mut BytesMut::from(s))
}

fn res_ok(s: &[u8]) -> ResponseHead {
    res(s).expect("valid").expect("complete")
}

fn with_cl(values: &[&str]) -> Vec<u8> {
    let mut s = b"POST / HTTP/1.1\r\nHost: a\r\n".to_vec();
    for v in values {
        s.extend_from_slice(format!("Content-Length: {v}\r\n").as_bytes());
    }
    s.extend_from_slice(b"\r\n");
    s
}

fn with_te(version: &str, values: &[&str]) -> Vec<u8> {
    let mut s = format!("POST / HTTP/{version}\r\nHost: a\r\n").into_bytes();
    for v in values {
        s.extend_from_slice(format!("Transfer-Encoding: {v}\r\n").as_bytes());
    }
    s.extend_from_slice(b"\r\n");
    s
}

fn write_req(head: &RequestHead, drop: &[&str], extra: &[(&str, &[u8])], close: bool) -> String {
    let mut out = Vec::new();
    write_request(head, head.target(), drop, extra, close, &mut out);
    String::from_utf8(out).unwrap()
}

fn write_res(head: &ResponseHead, close: bool) -> String {
    let mut out = Vec::new();
    write_response(head, close, &mut out);
    String::from_utf8(out).unwrap()
}

// ---- request parsing ----

#[test]
fn simple_get_leaves_pipelined_request_in_buf() {
    let first = b"GET /a?b=c HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n";
    let second = b"GET /next HTTP/1.1\r\nHost: example.com\r\n\r\n";
    let mut buf = BytesMut::from(&[&first[..], &second[..]].concat()[..]);
    let head = RequestHead::parse(&mut buf).unwrap().unwrap();
    assert_eq!(head.method(), "GET");
    assert_eq!(head.target(), "/a?b=c");
    assert_eq!(head.version(), Version::Http11);
    assert_eq!(head.header("HOST"), Some(&b"example.com"[..]));
    assert_eq!(head.header("accept"), Some(&b"*/*"[..]));
    assert_eq!(head.header("missing"), None);
    assert_eq!(head.framing(), Framing::Empty);
    assert!(head.keep_alive());
    assert!(!head.expects_continue());
    assert_eq!(&buf[..], &second[..]);
    let next = RequestHead::parse(&mut buf).unwrap().unwrap();
    assert_eq!(next.target(), "/next");
    assert!(buf.is_empty());
}

#[test]
fn headers_returns_all_values_in_order() {
    let head = req_ok(b"GET / HTTP/1.1\r\nX-A: 1\r\nHost: h\r\nx-a: 2\r\nX-B: 3\r\nX-A: \r\n\r\n");
    let all: Vec<&[u8]> = head.headers("x-A").collect();
    assert_eq!(all, vec![&b"1"[..], b"2", b""]);
    assert_eq!(head.headers("nope").count(), 0);
    assert_eq!(head.header("x-b"), Some(&b"3"[..]));
}

#[test]
fn partial_heads_at_every_split_point() {
    let full = b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n";
    for k in 0..full.len() {
        let mut buf = BytesMut::from(&full[..k]);
        assert!(
            RequestHead::parse(&mut buf).unwrap().is_none(),
            "split at {k}"
        );
        assert_eq!(buf.len(), k, "nothing consumed at {k}");
    }
    let mut buf = BytesMut::from(&[&full[..], b"abc"].concat()[..]);
    let head = RequestHead::parse(&mut buf).unwrap().unwrap();
    assert_eq!(head.framing(), Framing::Length(3));
    assert_eq!(&buf[..], b"abc");

    let full = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
    for k in 0..full.len() {
        let mut buf = BytesMut::from(&full[..k]);
        assert!(
            ResponseHead::parse(&mut buf).unwrap().is_none(),
            "split at {k}"
        );
        assert_eq!(buf.len(), k);
    }
    assert_eq!(res_ok(full).framing("GET"), Framing::Length(0));
}

#[test]
fn too_large() {
    // Incomplete and already MAX_HEAD bytes.
    let mut s = b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: ".to_vec();
    s.resize(MAX_HEAD, b'a');
    assert_eq!(req_err(&s), HeadError::TooLarge);
    assert_eq!(HeadError::TooLarge.status(), 431);
    // One byte less: read more.
    assert!(req(&s[..MAX_HEAD - 1]).unwrap().is_none());
    // Complete, but longer than MAX_HEAD.
    let mut big = s.clone();
    big.extend_from_slice(b"aaaa\r\n\r\n");
    assert_eq!(req_err(&big), HeadError::TooLarge);
    let mut r = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
    r.resize(MAX_HEAD + 10, b'a');
    r.extend_from_slice(b"\r\n\r\n");
    assert_eq!(res(&r).unwrap_err(), HeadError::TooLarge);
    // Exactly MAX_HEAD bytes is fine.
    let mut exact = b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: ".to_vec();
    exact.resize(MAX_HEAD - 4, b'a');
    exact.extend_from_slice(b"\r\n\r\n");
    let mut buf = BytesMut::from(&exact[..]);
    let head = RequestHead::parse(&mut buf).unwrap().unwrap();
    assert_eq!(head.header("x-big").unwrap().len(), MAX_HEAD - 4 - 32);
    assert!(buf.is_empty());
}

#[test]
fn too_many_headers() {
    let mut s = b"GET / HTTP/1.1\r\nHost: h\r\n".to_vec();
    for i in 1..MAX_HEADERS {
        s.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    let mut ok = s.clone();
    ok.extend_from_slice(b"\r\n");
    assert_eq!(req_ok(&ok).headers.len(), MAX_HEADERS);
    s.extend_from_slice(b"X-Last: v\r\n\r\n");
    let e = req_err(&s);
    assert_eq!(e, HeadError::TooManyHeaders);
    assert_eq!(e.status(), 431);
}

#[test]
fn host_rules() {
    assert!(matches!(
        req_err(b"GET / HTTP/1.1\r\n\r\n"),
        HeadError::Invalid(_)
    ));
    let e = req_err(b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n");
    assert!(matches!(e, HeadError::Invalid(_)));
    assert_eq!(e.status(), 400);
    assert!(matches!(
        req_err(b"GET / HTTP/1.0\r\nHost: a\r\nHOST: a\r\n\r\n"),
        HeadError::Invalid(_)
    ));
    let h10 = req_ok(b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!(h10.version(), Version::Http10);
    assert_eq!(h10.header("host"), None);
    assert_eq!(
        req_ok(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n").header("host"),
        Some(&b"a"[..])
    );
}

#[test]
fn connect_is_parsed() {
    let head = req_ok(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n");
    assert_eq!(head.method(), "CONNECT");
    assert_eq!(head.target(), "example.com:443");
}

#[test]
fn malformed_heads_are_invalid() {
    for bad in [
        &b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n"[..],
        b"GET / HTTP/2.0\r\nHost: h\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : h\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n\r\n",
        b"GET / HTTP/1.1\r\nHo(st: h\r\n\r\n",
        b"G\x01T / HTTP/1.1\r\nHost: h\r\n\r\n",
    ] {
        let e = req_err(bad);
        assert!(
            matches!(e, HeadError::Invalid(_)),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
        assert_eq!(e.status(), 400);
    }
    assert!(matches!(
        res(b"HTTP/1.1 099 Odd\r\n\r\n"),
        Err(HeadError::Invalid(_))
    ));
    assert!(matches!(
        res(b"HTTP/1.1 2000 OK\r\n\r\n"),
        Err(HeadError::Invalid(_))
    ));
    assert!(matches!(
        res(b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n"),
        Err(HeadError::Invalid(_))
    ));
}

// ---- Content-Length ----

#[test]
fn content_length_accepted() {
    for (values, n) in [
        (&["5"][..], 5),
        (&["5, 5"], 5),
        (&["5", "5"], 5),
        (&[" 5 "], 5),
        (&["5,5,\t5"], 5),
        (&["0"], 0),
        (&["0000000000000000005"], 5),
        (&["9999999999999999999"], 9_999_999_999_999_999_999),
    ] {
        let head = req_ok(&with_cl(values));
        assert_eq!(head.framing(), Framing::Length(n), "{values:?}");
    }
}

#[test]
fn content_length_refused() {
    for values in [
        &["5, 6"][..],
        &["5", "6"],
        &["-1"],
        &["+5"],
        &["5 5"],
        &["5,"],
        &[""],
        &["0x5"],
        &["5a"],
        &["18446744073709551615"],
        &["00000000000000000005"],
    ] {
        assert!(
            matches!(req_err(&with_cl(values)), HeadError::Invalid(_)),
            "{values:?}"
        );
        let mut r = b"HTTP/1.1 200 OK\r\n".to_vec();
        for v in values {
            r.extend_from_slice(format!("Content-Length: {v}\r\n").as_bytes());
        }
        r.extend_from_slice(b"\r\n");
        assert!(
            matches!(res(&r), Err(HeadError::Invalid(_))),
            "response {values:?}"
        );
    }
}

// ---- Transfer-Encoding ----

#[test]
fn request_transfer_encoding() {
    assert_eq!(
        req_ok(&with_te("1.1", &["chunked"])).framing(),
        Framing::Chunked
    );
    assert_eq!(
        req_ok(&with_te("1.1", &["CHUNKED"])).framing(),
        Framing::Chunked
    );
    // Empty list elements are no codings (RFC 9110 section 5.6.1).
    assert_eq!(
        req_ok(&with_te("1.1", &[", chunked ,"])).framing(),
        Framing::Chunked
    );
    // Anything but `chunked` alone is refused, as Envoy refuses it
    // (501): `identity` smuggles past parsers that read it as "no
    // coding", and a coding before `chunked` is one the application
    // might not undo.
    for values in [
        &["identity, chunked"][..],
        &["identity", "chunked"],
        &["gzip, chunked"],
        &["gzip", "chunked"],
        &["gzip,, chunked ,"],
        &["gzip"],
        &["identity"],
        &["chunked, gzip"],
        &["chunked", "gzip"],
        &["chunked, chunked"],
        &["chunked", "chunked"],
        &["chunked;x=1"],
        &[""],
        &["xchunked"],
    ] {
        let e = req_err(&with_te("1.1", values));
        assert_eq!(e, HeadError::UnsupportedTransferEncoding, "{values:?}");
        assert_eq!(e.status(), 501);
    }
    assert!(matches!(
        req_err(&with_te("1.0", &["chunked"])),
        HeadError::Invalid(_)
    ));
    let te_cl =
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n";
    assert!(matches!(req_err(te_cl), HeadError::Invalid(_)));
    let cl_te =
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert!(matches!(req_err(cl_te), HeadError::Invalid(_)));
}

#[test]
fn response_framing() {
    let chunked = res_ok(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
    assert_eq!(chunked.framing("GET"), Framing::Chunked);
    assert_eq!(chunked.framing("HEAD"), Framing::Empty);
    let te_cl =
        res_ok(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n");
    assert_eq!(te_cl.framing("POST"), Framing::Chunked);
    let gzip = res_ok(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\n");
    assert_eq!(gzip.framing("GET"), Framing::UntilClose);
    let cl = res_ok(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n");
    assert_eq!(cl.framing("GET"), Framing::Length(12));
    assert_eq!(cl.framing("HEAD"), Framing::Empty);
    assert_eq!(
        res_ok(b"HTTP/1.1 200 OK\r\n\r\n").framing("GET"),
        Framing::UntilClose
    );
    let cl204 = b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n";
    assert_eq!(res_ok(cl204).framing("GET"), Framing::Empty);
    let cl304 = b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n";
    assert_eq!(res_ok(cl304).framing("GET"), Framing::Empty);
    for s in [
        &b"HTTP/1.1 100 Continue\r\n\r\n"[..],
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nTransfer-Encoding: chunked\r\n\r\n",
    ] {
        assert_eq!(res_ok(s).framing("GET"), Framing::Empty);
    }
    assert_eq!(
        res_ok(b"HTTP/1.1 205 Reset\r\nContent-Length: 0\r\n\r\n").framing("GET"),
        Framing::Length(0)
    );
    for bad in [
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
    ] {
        assert!(matches!(res(bad), Err(HeadError::Invalid(_))));
    }
    let r = res_ok(b"HTTP/1.0 404 Not Found\r\nServer: x\r\n\r\nrest");
    assert_eq!(r.status(), 404);
    assert_eq!(r.version(), Version::Http10);
    assert_eq!(r.header("server"), Some(&b"x"[..]));
}

// ---- Connection, Expect ----

#[test]
fn upgrade_requests_are_told_apart() {
    let ask = |version: &str, fields: &str| {
        let raw = format!("GET /ws HTTP/{version}\r\nHost: h\r\n{fields}\r\n");
        req_ok(raw.as_bytes()).upgrade()
    };
    for (version, fields, expected) in [
        (
            "1.1",
            "Connection: Upgrade\r\nUpgrade: websocket\r\n",
            Upgrade::WebSocket,
        ),
        (
            "1.1",
            "connection: keep-alive, UPGRADE\r\nupgrade:  WebSocket \r\n",
            Upgrade::WebSocket,
        ),
        // h2c goes on as HTTP/1.1, without its upgrade fields.
        (
            "1.1",
            "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n",
            Upgrade::Absent,
        ),
        (
            "1.1",
            "Connection: upgrade\r\nUpgrade: foo/2\r\n",
            Upgrade::Unsupported,
        ),
        (
            "1.1",
            "Connection: upgrade\r\nUpgrade: websocket, foo\r\n",
            Upgrade::Unsupported,
        ),
        (
            "1.1",
            "Connection: upgrade\r\nUpgrade: websocket\r\nUpgrade: websocket\r\n",
            Upgrade::Unsupported,
        ),
        // Without the Connection token, Upgrade is a hop-by-hop field
        // like any other: dropped.
        ("1.1", "Upgrade: websocket\r\n", Upgrade::Absent),
        ("1.1", "Connection: upgrade\r\n", Upgrade::Absent),
        (
            "1.0",
            "Connection: upgrade\r\nUpgrade: websocket\r\n",
            Upgrade::Absent,
        ),
    ] {
        assert_eq!(ask(version, fields), expected, "{version} {fields:?}");
    }
}

#[test]
fn a_switch_keeps_its_upgrade_fields_and_nothing_else_does() {
    let head = res_ok(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
    );
    assert_eq!(
        write_res(&head, true),
        "HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
         connection: upgrade\r\nupgrade: websocket\r\n\r\n"
    );
    let head = res_ok(b"HTTP/1.1 200 OK\r\nUpgrade: websocket\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(
        write_res(&head, false),
        "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
    );
}

#[test]
fn keep_alive_rules() {
    for (version, conn, expected) in [
        ("1.1", None, true),
        ("1.1", Some("close"), false),
        ("1.1", Some("Close"), false),
        ("1.1", Some("keep-alive"), true),
        ("1.1", Some("upgrade, CLOSE"), false),
        ("1.1", Some("closed"), true),
        ("1.0", None, false),
        ("1.0", Some("keep-alive"), true),
        ("1.0", Some("Keep-Alive"), true),
        ("1.0", Some("keep-alive, close"), false),
        ("1.0", Some("x"), false),
    ] {
        let c = conn
            .map(|c| format!("Connection: {c}\r\n"))
            .unwrap_or_default();
        let head = req_ok(format!("GET / HTTP/{version}\r\nHost: h\r\n{c}\r\n").as_bytes());
        assert_eq!(head.keep_alive(), expected, "request {version} {conn:?}");
        let r = res_ok(format!("HTTP/{version} 200 OK\r\n{c}\r\n").as_bytes());
        assert_eq!(r.keep_alive(), expected, "response {version} {conn:?}");
    }
    let two = req_ok(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n");
    assert!(!two.keep_alive());
    let split = req_ok(b"GET / HTTP/1.0\r\nConnection: foo\r\nConnection: keep-alive\r\n\r\n");
    assert!(split.keep_alive());
}

#[test]
fn expect_continue() {
    assert!(
        req_ok(b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue \r\n\r\n").expects_continue()
    );
    assert!(
        !req_ok(b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue-x\r\n\r\n").expects_continue()
    );
    assert!(!req_ok(b"POST / HTTP/1.1\r\nHost: h\r\n\r\n").expects_continue());
}

// ---- writers ----

#[test]
fn write_request_filters_and_normalises() {
    let head = req_ok(
        b"POST /x HTTP/1.1\r\n\
          Host: h\r\n\
          X-Keep: 1\r\n\
          Connection: keep-alive, X-Secret, te\r\n\
          Keep-Alive: timeout=5\r\n\
          Proxy-Connection: keep-alive\r\n\
          Content-Length: 4, 4\r\n\
          Upgrade: h2c\r\n\
          Expect: 100-continue\r\n\
          TE: trailers\r\n\
          x-secret: s\r\n\
          X-Authz: spoofed\r\n\
          Content-Length: 4\r\n\
          x-LAST: v\r\n\r\n",
    );
    let out = write_req(
        &head,
        &["x-authz"],
        &[("x-forwarded-proto", b"https"), ("X-Id", b"7")],
        false,
    );
    assert_eq!(
        out,
        "POST /x HTTP/1.1\r\n\
         Host: h\r\n\
         X-Keep: 1\r\n\
         content-length: 4\r\n\
         TE: trailers\r\n\
         x-LAST: v\r\n\
         x-forwarded-proto: https\r\n\
         X-Id: 7\r\n\r\n"
    );
    let closed = write_req(&head, &[], &[], true);
    assert!(
        closed.ends_with("X-Authz: spoofed\r\nx-LAST: v\r\nconnection: close\r\n\r\n"),
        "{closed}"
    );
    let mut out = Vec::new();
    write_request(&head, "http://h/x", &[], &[], false, &mut out);
    assert!(out.starts_with(b"POST http://h/x HTTP/1.1\r\n"));
}

#[test]
fn write_request_te_and_framing_headers() {
    let head = req_ok(b"GET / HTTP/1.0\r\nte: gzip\r\nHOST: h\r\n\r\n");
    assert_eq!(
        write_req(&head, &[], &[], false),
        "GET / HTTP/1.0\r\nHOST: h\r\n\r\n"
    );
    let te_dropped = req_ok(b"GET / HTTP/1.1\r\nHost: h\r\nTE: trailers\r\n\r\n");
    assert_eq!(
        write_req(&te_dropped, &["te"], &[], false),
        "GET / HTTP/1.1\r\nHost: h\r\n\r\n"
    );
    // Framing and routing fields survive Connection tokens.
    let head = req_ok(
        b"POST / HTTP/1.1\r\nHost: h\r\nConnection: transfer-encoding, host, content-length\r\n\
          Transfer-Encoding: chunked\r\n\r\n",
    );
    assert_eq!(head.framing(), Framing::Chunked);
    assert_eq!(
        write_req(&head, &[], &[], false),
        "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let head = req_ok(
        b"POST / HTTP/1.1\r\nContent-Length: 007\r\nConnection: content-length\r\nHost: h\r\n\r\n",
    );
    assert_eq!(
        write_req(&head, &[], &[], false),
        "POST / HTTP/1.1\r\ncontent-length: 7\r\nHost: h\r\n\r\n"
    );
}

#[test]
fn write_response_filters_and_normalises() {
    let head = res_ok(
        b"HTTP/1.1 200 Fine Thanks\r\nServer: s\r\nConnection: X-Hop\r\nX-Hop: 1\r\n\
          Content-Length: 10\r\nKeep-Alive: timeout=1\r\nContent-Length: 10\r\nX-Other: 2\r\n\r\n",
    );
    assert_eq!(
        write_res(&head, false),
        "HTTP/1.1 200 Fine Thanks\r\nServer: s\r\ncontent-length: 10\r\nX-Other: 2\r\n\r\n"
    );
    assert!(write_res(&head, true).ends_with("X-Other: 2\r\nconnection: close\r\n\r\n"));
    // Chunked wins over Content-Length.
    let head =
        res_ok(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n");
    assert_eq!(
        write_res(&head, false),
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    // So does another coding (the body runs until close).
    let head = res_ok(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\n");
    assert_eq!(
        write_res(&head, true),
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nconnection: close\r\n\r\n"
    );
    // Kept as information where there is no body.
    let head = res_ok(b"HTTP/1.0 304 Not Modified\r\nContent-Length: 5,5\r\n\r\n");
    assert_eq!(
        write_res(&head, false),
        "HTTP/1.0 304 Not Modified\r\ncontent-length: 5\r\n\r\n"
    );
    // Reasons: empty, absent, with obs-text.
    assert_eq!(
        write_res(&res_ok(b"HTTP/1.1 200 \r\n\r\n"), false),
        "HTTP/1.1 200 \r\n\r\n"
    );
    assert_eq!(
        write_res(&res_ok(b"HTTP/1.1 200\r\n\r\n"), false),
        "HTTP/1.1 200 \r\n\r\n"
    );
    assert_eq!(
        write_res(&res_ok(b"HTTP/1.1 200 \xe9t\xe9\r\n\r\n"), false),
        "HTTP/1.1 200 \r\n\r\n"
    );
    assert_eq!(
        write_res(&res_ok(b"HTTP/1.1 999 X\r\n\r\n"), false),
        "HTTP/1.1 999 X\r\n\r\n"
    );
}

#[test]
fn written_heads_reparse() {
    let head = req_ok(b"PUT /u HTTP/1.1\nHost: h\nContent-Length: 2\nConnection: close\n\n");
    let mut out = Vec::new();
    write_request(&head, head.target(), &[], &[], !head.keep_alive(), &mut out);
    let again = req_ok(&out);
    assert_eq!(again.framing(), Framing::Length(2));
    assert!(!again.keep_alive());
    assert_eq!(again.method(), "PUT");
}

// ---- chunked bodies ----

/// Scans `body` whole and one byte at a time; both must agree.
fn scan(body: &[u8]) -> Result<(usize, bool), BodyError> {
    let whole = ChunkedScanner::default().scan(body);
    let mut s = ChunkedScanner::default();
    let mut bytewise = Ok((body.len(), false));
    for (i, b) in body.iter().enumerate() {
        match s.scan(std::slice::from_ref(b)) {
            Ok((1, true)) => {
                bytewise = Ok((i + 1, true));
                break;
            }
            Ok((1, false)) => {}
            Ok(other) => panic!("one byte scanned as {other:?}"),
            Err(e) => {
                bytewise = Err(e);
                break;
            }
        }
    }
    assert_eq!(whole, bytewise, "{:?}", String::from_utf8_lossy(body));
    whole
}

fn invalid(body: &[u8]) {
    assert!(scan(body).is_err(), "{:?}", String::from_utf8_lossy(body));
}

#[test]
fn chunked_simple_and_leftovers() {
    let body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    assert_eq!(scan(body), Ok((body.len(), true)));
    let mut more = body.to_vec();
    more.extend_from_slice(b"GET / HTTP/1.1\r\n");
    assert_eq!(scan(&more), Ok((body.len(), true)));
    assert_eq!(scan(b"0\r\n\r\n"), Ok((5, true)));
    assert_eq!(scan(b"A\r\n0123456789\r\n0\r\n\r\n"), Ok((20, true)));
    assert_eq!(scan(b"a\r\n0123456789\r\n00\r\n\r\n"), Ok((21, true)));
    assert_eq!(scan(b"5\r\nhel"), Ok((6, false)));
    assert_eq!(scan(b""), Ok((0, false)));
}

#[test]
fn chunked_resumes_across_calls_and_after_done() {
    let mut s = ChunkedScanner::default();
    assert_eq!(s.scan(b"10\r\n0123456"), Ok((11, false)));
    assert_eq!(s.scan(b"789abcdef"), Ok((9, false)));
    assert_eq!(s.scan(b"\r"), Ok((1, false)));
    assert_eq!(s.scan(b"\n0\r\n\r\nNEXT"), Ok((6, true)));
    assert_eq!(s.scan(b"more"), Ok((0, true)));
    let mut s = ChunkedScanner::default();
    assert!(s.scan(b"x").is_err());
    assert!(s.scan(b"0\r\n\r\n").is_err());
}

#[test]
fn chunked_big_size_bulk_skip() {
    let mut s = ChunkedScanner::default();
    assert_eq!(s.scan(b"ffffffffffffffff\r\n"), Ok((18, false)));
    assert_eq!(s.scan(&[0u8; 8192]), Ok((8192, false)));
    assert_eq!(s.scan(b"\r\n\r\n"), Ok((4, false)));
}

#[test]
fn chunked_extensions() {
    assert_eq!(scan(b"3;name=value\r\nabc\r\n0\r\n\r\n"), Ok((24, true)));
    assert_eq!(
        scan(b"3 ;a\r\nabc\r\n0 \t; last ; q=\"x y;\"\r\n\r\n").map(|r| r.1),
        Ok(true)
    );
    assert_eq!(scan(b"3;\r\nabc\r\n0\r\n\r\n").map(|r| r.1), Ok(true));
    let mut long = b"1;".to_vec();
    long.resize(MAX_CHUNK_EXT + 1, b'a');
    long.extend_from_slice(b"\r\nx\r\n0\r\n\r\n");
    assert_eq!(scan(&long).map(|r| r.1), Ok(true));
    let mut too_long = b"1;".to_vec();
    too_long.resize(MAX_CHUNK_EXT + 2, b'a');
    too_long.extend_from_slice(b"\r\nx\r\n0\r\n\r\n");
    invalid(&too_long);
    invalid(b"3 \r\nabc\r\n0\r\n\r\n");
    invalid(b"3;a\x01\r\nabc\r\n0\r\n\r\n");
    invalid(b"3;a\x7f\r\nabc\r\n0\r\n\r\n");
    invalid(b"3;a\xff\r\nabc\r\n0\r\n\r\n");
    invalid(b"3;a\nabc\r\n0\r\n\r\n");
}

#[test]
fn chunked_trailers() {
    let body = b"1\r\nx\r\n0\r\nX-Sum: abc\r\nx-b:\r\nY:  \t v\xff\r\n\r\n";
    assert_eq!(scan(body), Ok((body.len(), true)));
    invalid(b"0\r\nX-Sum: a\r\n folded\r\n\r\n");
    invalid(b"0\r\n\tfolded\r\n\r\n");
    invalid(b"0\r\n: nameless\r\n\r\n");
    invalid(b"0\r\nNo colon\r\n\r\n");
    invalid(b"0\r\nNoColon\r\n\r\n");
    invalid(b"0\r\nX: a\nY: b\r\n\r\n");
    invalid(b"0\r\nX: a\x00\r\n\r\n");
    invalid(b"0\r\nX: a\r\n\n");
    invalid(b"0\r\n\n");
    let mut big = b"0\r\nX-Big: ".to_vec();
    big.resize(MAX_TRAILERS - 4 + 3, b'a');
    let mut fits = big.clone();
    fits.extend_from_slice(b"\r\n\r\n");
    assert_eq!(fits.len() - 3, MAX_TRAILERS);
    assert_eq!(scan(&fits), Ok((fits.len(), true)));
    big.extend_from_slice(b"a\r\n\r\n");
    invalid(&big);
}

#[test]
fn chunked_invalid_sizes_and_line_ends() {
    invalid(b"g\r\n");
    invalid(b"\r\n");
    invalid(b" 5\r\nhello\r\n0\r\n\r\n");
    invalid(b"-5\r\nhello\r\n0\r\n\r\n");
    invalid(b"+5\r\nhello\r\n0\r\n\r\n");
    invalid(b"0x5\r\nhello\r\n0\r\n\r\n");
    invalid(b"00000000000000005\r\nhello\r\n0\r\n\r\n");
    invalid(b"10000000000000000\r\n");
    assert_eq!(scan(b"0000000000000000\r\n\r\n"), Ok((20, true)));
    invalid(b"5\nhello\r\n0\r\n\r\n");
    invalid(b"5\rhello\r\n0\r\n\r\n");
    invalid(b"5\r\nhello\n0\r\n\r\n");
    invalid(b"5\r\nhelloX\r\n0\r\n\r\n");
    invalid(b"5\r\nhello\rX0\r\n\r\n");
    invalid(b"5\r\nhello0\r\n\r\n");
    invalid(b"0\r\n\rX");
    invalid(b"0\n\n");
}
