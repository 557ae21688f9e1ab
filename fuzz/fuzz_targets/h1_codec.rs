//! The HTTP/1.x codec on arbitrary bytes: parsing, accessors, framing and
//! writers never panic, what the writers emit parses again with the same
//! framing, and the chunked scanner gives the same answer whether the body
//! comes whole or split in two.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use meshward_proxy::h1_codec::{
    ChunkedScanner, Framing, HeadError, MAX_HEAD, RequestHead, ResponseHead, write_request,
    write_response,
};

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    scan_agrees(data, split);

    let mut buf = BytesMut::from(data);
    if let Ok(Some(head)) = RequestHead::parse(&mut buf) {
        let _ = (
            head.method(),
            head.target(),
            head.version(),
            head.keep_alive(),
            head.expects_continue(),
            head.upgrade(),
        );
        let _ = (head.header("host"), head.headers("content-length").count());
        let framing = head.framing();
        let mut out = Vec::new();
        write_request(
            &head,
            head.target(),
            &["x-drop"],
            &[("x-extra", b"1")],
            !head.keep_alive(),
            &mut out,
        );
        match RequestHead::parse(&mut BytesMut::from(&out[..])) {
            Ok(Some(again)) => {
                assert_eq!(again.framing(), framing);
                assert_eq!(again.method(), head.method());
                assert_eq!(again.target(), head.target());
            }
            Err(HeadError::TooLarge) => assert!(out.len() >= MAX_HEAD),
            Err(HeadError::TooManyHeaders) => {}
            other => panic!("rewritten request {out:?} parsed as {other:?}"),
        }
        if framing == Framing::Chunked {
            scan_agrees(&buf, split.min(buf.len()));
        }
    }

    let mut buf = BytesMut::from(data);
    if let Ok(Some(head)) = ResponseHead::parse(&mut buf) {
        let _ = (
            head.status(),
            head.version(),
            head.keep_alive(),
            head.header("content-length"),
        );
        for method in ["GET", "HEAD"] {
            let framing = head.framing(method);
            let mut out = Vec::new();
            write_response(&head, !head.keep_alive(), &mut out);
            match ResponseHead::parse(&mut BytesMut::from(&out[..])) {
                Ok(Some(again)) => {
                    assert_eq!(again.framing(method), framing);
                    assert_eq!(again.status(), head.status());
                }
                Err(HeadError::TooLarge) => assert!(out.len() >= MAX_HEAD),
                Err(HeadError::TooManyHeaders) => {}
                other => panic!("rewritten response {out:?} parsed as {other:?}"),
            }
        }
        if head.framing("GET") == Framing::Chunked {
            scan_agrees(&buf, split.min(buf.len()));
        }
    }
});

/// Scans `body` whole, then in two parts split at `at`: same outcome.
fn scan_agrees(body: &[u8], at: usize) {
    let whole = ChunkedScanner::default().scan(body);
    let mut s = ChunkedScanner::default();
    let parts = match s.scan(&body[..at]) {
        Ok((n, true)) => Ok((n, true)),
        Ok((n, false)) => {
            assert_eq!(n, at);
            s.scan(&body[at..]).map(|(m, done)| (n + m, done))
        }
        Err(e) => Err(e),
    };
    assert_eq!(whole, parts);
    match whole {
        Ok((n, true)) => {
            assert!(n <= body.len());
            assert_eq!(s.scan(b"x"), Ok((0, true)));
        }
        Ok((n, false)) => assert_eq!(n, body.len()),
        Err(_) => {}
    }
}
