use super::*;

fn head(raw: &str) -> RequestHead {
    let mut buf = BytesMut::from(raw);
    RequestHead::parse(&mut buf)
        .expect("valid head")
        .expect("complete head")
}

#[test]
fn targets_in_each_form() {
    let h = head("GET /a?b HTTP/1.1\r\nHost: svc:80\r\n\r\n");
    let t = target(&h).unwrap();
    assert_eq!((t.host, &*t.path, t.absolute), ("svc:80", "/a?b", false));

    let h = head("GET http://other:8080/x HTTP/1.1\r\nHost: svc\r\n\r\n");
    let t = target(&h).unwrap();
    assert_eq!((t.host, &*t.path, t.absolute), ("other:8080", "/x", true));

    let h = head("GET HTTP://other?q=1 HTTP/1.1\r\nHost: svc\r\n\r\n");
    let t = target(&h).unwrap();
    assert_eq!((t.host, &*t.path), ("other", "/?q=1"));

    let h = head("OPTIONS * HTTP/1.1\r\nHost: svc\r\n\r\n");
    assert_eq!(target(&h).unwrap().path, "*");

    for bad in [
        "CONNECT svc:443 HTTP/1.1\r\nHost: svc:443\r\n\r\n",
        "CONNECT /x HTTP/1.1\r\nHost: svc\r\n\r\n",
        "GET http://user@svc/ HTTP/1.1\r\nHost: svc\r\n\r\n",
        "GET http:///x HTTP/1.1\r\nHost: svc\r\n\r\n",
        "GET ftp://svc/x HTTP/1.1\r\nHost: svc\r\n\r\n",
    ] {
        assert!(target(&head(bad)).is_err(), "{bad:?} must be refused");
    }
}

#[test]
fn a_forwarded_head_gets_the_proxys_fields_in_place_of_the_originals() {
    let rewrite = |raw: &str, xfcc: Option<&[u8]>| {
        let h = head(raw);
        let t = target(&h).unwrap();
        let r = Rewrite::new(&h, &t, xfcc, h.upgrade());
        let added: Vec<String> = r
            .added()
            .iter()
            .map(|(n, v)| format!("{n}: {}", String::from_utf8_lossy(v)))
            .collect();
        (added, r.drop)
    };
    let (added, drop) = rewrite(
        "GET /a HTTP/1.1\r\nHost: svc\r\nX-Forwarded-Client-Cert: forged\r\n\r\n",
        Some(b"By=me"),
    );
    assert_eq!(added, ["x-forwarded-client-cert: By=me"]);
    assert_eq!(drop, [XFCC]);
    // An absolute-form target's authority becomes the Host.
    let (added, drop) = rewrite("GET http://other:81/a HTTP/1.1\r\nHost: svc\r\n\r\n", None);
    assert_eq!(added, ["host: other:81"]);
    assert_eq!(drop, [XFCC, "host"]);
    // A WebSocket handshake keeps its upgrade fields; h2c does not.
    let (added, _) = rewrite(
        "GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n\r\n",
        None,
    );
    assert_eq!(added, ["connection: upgrade", "upgrade: WebSocket"]);
    let (added, _) = rewrite(
        "GET / HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
        None,
    );
    assert!(added.is_empty(), "{added:?}");
}

#[tokio::test]
async fn forward_takes_exactly_the_body_and_leaves_the_next_request() {
    let mut src: &[u8] = b"lo wor";
    let mut buf = BytesMut::from(&b"hel"[..]);
    let mut dst = Vec::new();
    let mut out = b"HEAD\r\n".to_vec();
    let mut n = 0;
    forward(
        &mut src,
        &mut buf,
        &mut dst,
        Framing::Length(5),
        &mut out,
        &mut n,
    )
    .await
    .unwrap();
    assert_eq!(n, 5);
    assert_eq!(dst, b"HEAD\r\nhello");
    assert_eq!(&buf[..], b" wor", "bytes after the body stay buffered");
}

#[tokio::test]
async fn bytes_after_a_response_make_its_connection_unusable() {
    for (extra, reusable) in [(&b""[..], true), (&b"HTTP/1.1 200 OK\r\n"[..], false)] {
        let mut head_buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"[..]);
        let resp = ResponseHead::parse(&mut head_buf).unwrap().unwrap();
        let mut up_buf = BytesMut::from(&[&b"ok"[..], extra].concat()[..]);
        let mut up: &[u8] = b"";
        let mut down = Vec::new();
        let r = relay(
            &mut up,
            &mut up_buf,
            &mut down,
            &resp,
            ("GET", false, &[]),
            &mut Vec::new(),
        )
        .await;
        assert_eq!(
            (r.status, r.flags.as_str(), r.reusable),
            (200, "-", reusable),
            "{extra:?}"
        );
        assert!(down.ends_with(b"\r\n\r\nok"));
    }
}

#[tokio::test]
async fn forward_reports_a_truncated_body() {
    let mut src: &[u8] = b"";
    let mut buf = BytesMut::from(&b"abc"[..]);
    let mut dst = Vec::new();
    let mut n = 0;
    let r = forward(
        &mut src,
        &mut buf,
        &mut dst,
        Framing::Length(10),
        &mut Vec::new(),
        &mut n,
    )
    .await;
    assert!(matches!(r, Err(ForwardError::Truncated)), "{r:?}");
    assert_eq!(n, 3, "what got through is counted");
}

#[tokio::test]
async fn forward_chunked_stops_at_the_last_chunk() {
    let body = b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n";
    let mut src: &[u8] = &body[5..];
    let mut buf = BytesMut::from(&body[..5]);
    let mut dst = Vec::new();
    let mut n = 0;
    forward(
        &mut src,
        &mut buf,
        &mut dst,
        Framing::Chunked,
        &mut Vec::new(),
        &mut n,
    )
    .await
    .unwrap();
    assert_eq!(n, 3, "the payload, not the chunk lines");
    assert_eq!(dst, &body[..13]);
    assert_eq!(&buf[..], b"GET / HTTP/1.1\r\n");
}

#[tokio::test(start_paused = true)]
async fn a_head_left_unfinished_times_out_but_an_idle_connection_does_not() {
    let (mut client, mut server) = tokio::io::duplex(1024);
    let mut buf = BytesMut::new();
    // Nothing sent: waiting has no limit (paused time would otherwise
    // jump straight to any timer).
    let idle = tokio::time::timeout(
        HEAD_TIMEOUT * 10,
        read_head(&mut server, &mut buf, RequestHead::parse, None),
    )
    .await;
    assert!(idle.is_err(), "still waiting after ten head timeouts");
    client.write_all(b"GET / HTTP/1.1\r\nHost:").await.unwrap();
    let started = tokio::time::Instant::now();
    let r = read_head(&mut server, &mut buf, RequestHead::parse, None).await;
    assert!(matches!(r, Err(ReadError::Timeout)), "{r:?}");
    assert_eq!(started.elapsed(), HEAD_TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn an_idle_connection_is_closed_without_an_answer() {
    let (mut client, mut server) = tokio::io::duplex(1024);
    let mut buf = BytesMut::new();
    let timeout = std::time::Duration::from_secs(3600);
    let mut idle = IdleTimer::new(timeout);
    let peer = "127.0.0.1:1".parse().unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let head = next_request(&mut server, &mut buf, peer, &mut idle).await;
    assert_eq!(head.map(|h| h.method().to_string()).as_deref(), Some("GET"));
    let started = tokio::time::Instant::now();
    assert!(
        next_request(&mut server, &mut buf, peer, &mut idle)
            .await
            .is_none()
    );
    assert_eq!(started.elapsed(), timeout);
    drop(server);
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).await.unwrap();
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
}

fn switch() -> ResponseHead {
    let mut buf = BytesMut::from(
        &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"[..],
    );
    ResponseHead::parse(&mut buf).unwrap().unwrap()
}

/// A tunnel for `switch()` between `up` and `down`, with the bytes
/// each side sent early, in a task.
fn spawn_tunnel<F>(
    mut up: tokio::io::DuplexStream,
    mut down: tokio::io::DuplexStream,
    (up_early, down_early): (&'static [u8], &'static [u8]),
    ends: (std::time::Duration, F),
) -> tokio::task::JoinHandle<Tunneled>
where
    F: std::future::Future<Output = String> + Send + 'static,
{
    tokio::spawn(async move {
        let mut up_buf = BytesMut::from(up_early);
        let mut down_buf = BytesMut::from(down_early);
        let resp = switch();
        tunnel(
            &mut up,
            &mut up_buf,
            &mut down,
            &mut down_buf,
            &resp,
            ends,
            &mut Vec::new(),
        )
        .await
    })
}

/// Reads exactly `n` bytes.
async fn take<S: AsyncRead + Unpin>(s: &mut S, n: usize) -> String {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).await.unwrap();
    String::from_utf8(b).unwrap()
}

#[tokio::test]
async fn a_tunnel_carries_early_bytes_both_ways_and_half_closes() {
    let (up, mut app) = tokio::io::duplex(1024);
    let (down, mut client) = tokio::io::duplex(1024);
    let hour = std::time::Duration::from_secs(3600);
    let ends = (hour, std::future::pending::<String>());
    let tunnel = spawn_tunnel(up, down, (b"app-first", b"client-first"), ends);
    let head =
        "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n";
    assert_eq!(
        take(&mut client, head.len() + 9).await,
        format!("{head}app-first")
    );
    assert_eq!(take(&mut app, 12).await, "client-first");
    client.write_all(b"ping").await.unwrap();
    assert_eq!(take(&mut app, 4).await, "ping");
    app.write_all(b"pong").await.unwrap();
    assert_eq!(take(&mut client, 4).await, "pong");
    // The client is done sending: the application sees the end, and
    // can still answer.
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    app.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    app.write_all(b"bye").await.unwrap();
    drop(app);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"bye");
    let t = tunnel.await.unwrap();
    assert_eq!((t.flags.as_str(), t.reason.as_str()), ("-", "forwarded"));
    assert_eq!(t.bytes, (12 + 4, 9 + 4 + 3));
}

#[tokio::test(start_paused = true)]
async fn a_silent_tunnel_is_closed_after_the_idle_timeout() {
    let (up, mut app) = tokio::io::duplex(1024);
    let (down, mut client) = tokio::io::duplex(1024);
    let timeout = std::time::Duration::from_secs(600);
    let started = tokio::time::Instant::now();
    let ends = (timeout, std::future::pending::<String>());
    let tunnel = spawn_tunnel(up, down, (b"", b""), ends);
    let mut head = [0u8; 12];
    client.read_exact(&mut head).await.unwrap();
    // Traffic halfway through restarts the wait.
    tokio::time::sleep(timeout / 2).await;
    client.write_all(b"x").await.unwrap();
    assert_eq!(take(&mut app, 1).await, "x");
    let moved = tokio::time::Instant::now();
    let t = tunnel.await.unwrap();
    assert!(t.reason.starts_with("idle_timeout"), "{}", t.reason);
    assert!(moved.elapsed() >= timeout, "{:?}", moved.elapsed());
    assert!(started.elapsed() < timeout * 2, "{:?}", started.elapsed());
}

#[tokio::test]
async fn a_tunnel_ends_when_told_to_with_the_reason() {
    let (up, mut app) = tokio::io::duplex(1024);
    let (down, mut client) = tokio::io::duplex(1024);
    let (tell, told) = tokio::sync::oneshot::channel::<()>();
    let stop = async move {
        let _ = told.await;
        "policy_changed".to_string()
    };
    let tunnel = spawn_tunnel(
        up,
        down,
        (b"", b""),
        (std::time::Duration::from_secs(3600), stop),
    );
    let mut head = [0u8; 12];
    client.read_exact(&mut head).await.unwrap();
    client.write_all(b"x").await.unwrap();
    assert_eq!(take(&mut app, 1).await, "x");
    tell.send(()).unwrap();
    let t = tunnel.await.unwrap();
    assert_eq!(
        (t.flags.as_str(), t.reason.as_str()),
        ("-", "policy_changed")
    );
    // Both connections are closed with it.
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    app.read_to_end(&mut rest).await.unwrap();
}

#[tokio::test]
async fn the_h2_preface_is_recognised_across_reads() {
    let mut src: &[u8] = &H2_PREFACE[3..];
    let mut buf = BytesMut::from(&H2_PREFACE[..3]);
    assert_eq!(sniff_h2(&mut src, &mut buf).await.unwrap(), Some(true));
    let mut src: &[u8] = b"T / HTTP/1.1\r\n";
    let mut buf = BytesMut::from(&b"GE"[..]);
    assert_eq!(sniff_h2(&mut src, &mut buf).await.unwrap(), Some(false));
    assert_eq!(&buf[..], b"GE", "nothing is consumed");
    let mut src: &[u8] = b"";
    let mut buf = BytesMut::new();
    assert_eq!(sniff_h2(&mut src, &mut buf).await.unwrap(), None);
}
