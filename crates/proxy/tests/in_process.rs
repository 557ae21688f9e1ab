//! The proxy driven in-process through the test source
//! (`source::memory::MemorySource`, feature `test-util`): configuration
//! and credentials pushed as the control plane will push them, and what a
//! peer of the proxy observes on real sockets.

mod support;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_closes_an_open_tcp_connection_the_new_policy_denies() {
    let h = Harness::start("").await;
    let frontend = h.issue("frontend");
    let reports = h.issue("reports");
    let mut denied_later = h.connect_as(&frontend).await;
    let mut still_allowed = h.connect_as(&reports).await;
    echo_back(&mut denied_later, "before").await.unwrap();
    echo_back(&mut still_allowed, "before").await.unwrap();

    h.push(&deny_from("frontend"));
    assert!(
        closed(&mut denied_later).await,
        "the connection the new policy denies stays open"
    );
    // The other one is untouched, and a new frontend connection refused.
    echo_back(&mut still_allowed, "after").await.unwrap();
    let mut again = h.connect_as(&frontend).await;
    assert!(echo_back(&mut again, "again").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_update_is_presented_on_the_next_handshake_while_open_connections_stay() {
    let h = Harness::start("").await;
    let frontend = h.issue("frontend");
    let mut open = h.connect_as(&frontend).await;
    echo_back(&mut open, "one").await.unwrap();
    let first = presented(&open);

    let renewed = h.issue("orders");
    push_credentials(&h.source, &renewed).unwrap();
    let want = leaf_of(&renewed);
    assert_ne!(first, want);
    eventually("the renewed certificate on a new handshake", || async {
        let conn = h.connect_as(&frontend).await;
        (presented(&conn) == want).then_some(())
    })
    .await;
    // The connection made before the renewal goes on.
    echo_back(&mut open, "two").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_update_is_refused_counted_and_the_previous_state_keeps_serving() {
    let h = Harness::start(&deny_from("intruder")).await;
    let frontend = h.issue("frontend");
    let intruder = h.issue("intruder");
    assert_eq!(h.rejected().await, 0.0);

    // Serves what it had: frontend through, intruder refused.
    let serves_as_before = || async {
        let mut ok = h.connect_as(&frontend).await;
        echo_back(&mut ok, "ping").await.unwrap();
        let mut refused = h.connect_as(&intruder).await;
        assert!(echo_back(&mut refused, "ping").await.is_err());
        assert_eq!(presented(&ok), leaf_of(&orders_now(&h)));
    };

    // 1. Resources that do not validate (a DENY without rules' list).
    let invalid = mesh::authorization_policy(NS, "broken", "  action: DENY\n  rules: 7");
    assert!(
        h.source
            .push_yaml(&[("mesh.yaml", &config(&h.ports(), &invalid))])
            .is_err()
    );
    eventually("the first refusal counted", || async {
        (h.rejected().await == 1.0).then_some(())
    })
    .await;
    let s = h.source_state("config").await;
    assert_eq!(s["state"], "refused", "{s}");
    serves_as_before().await;

    // 2. Valid resources the proxy cannot apply: no WorkloadEntry for it.
    h.source
        .push_yaml(&[("mesh.yaml", &mesh::mesh_strict())])
        .unwrap();
    eventually("the second refusal counted", || async {
        (h.rejected().await == 2.0).then_some(())
    })
    .await;
    let s = h.source_state("config").await;
    assert_eq!(s["state"], "refused", "{s}");
    assert!(
        s["error"].as_str().is_some_and(|e| e.contains("orders")),
        "{s}"
    );
    serves_as_before().await;

    // 3. Credentials of another workload.
    push_credentials(&h.source, &h.issue("frontend")).unwrap();
    eventually("the third refusal counted", || async {
        (h.rejected().await == 3.0).then_some(())
    })
    .await;
    let s = h.source_state("certs").await;
    assert_eq!(s["state"], "refused", "{s}");
    serves_as_before().await;

    // 4. Credentials that do not parse: refused by the source itself.
    assert!(
        h.source
            .push_credentials_pem("not a chain", "not a key", "not roots")
            .is_err()
    );
    eventually("the fourth refusal counted", || async {
        (h.rejected().await == 4.0).then_some(())
    })
    .await;
    let s = h.source_state("certs").await;
    assert!(
        s["error"]
            .as_str()
            .is_some_and(|e| e.contains("private key")),
        "{s}"
    );
    serves_as_before().await;

    // A good update after them applies.
    h.push("");
    eventually("the intruder let in by the next good update", || async {
        let mut c = h.connect_as(&intruder).await;
        echo_back(&mut c, "ping").await.ok()
    })
    .await;
    // The state is recorded just after the swap that let the intruder in.
    eventually("the config source ok", || async {
        (h.source_state("config").await["state"] == "ok").then_some(())
    })
    .await;
}

/// A request the policy denies is refused identically over HTTP/1.1 and
/// HTTP/2: one admission path decides both (status, body, response flag,
/// and the access log's decision, reason and policy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_request_is_refused_identically_over_http1_and_http2() {
    let h = Harness::start(&mesh::authorization_policy(
        NS,
        "no-admin",
        "  action: DENY\n  rules: [{to: [{operation: {paths: [\"/admin\"]}}]}]",
    ))
    .await;
    let frontend = h.issue("frontend");
    let host = "orders.production.svc.cluster.local";

    let tls = mtls_connect(
        &frontend.dir,
        &frontend.root(),
        h.inbound_http,
        b"istio-http/1.1",
    )
    .await
    .unwrap();
    let (mut h1, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let tls = mtls_connect(&frontend.dir, &frontend.root(), h.inbound_http, b"h2")
        .await
        .unwrap();
    let mut h2 = h2_handshake(tls).await;

    let mut answers = Vec::new();
    for (version, path) in [
        (http::Version::HTTP_11, "/api"),
        (http::Version::HTTP_11, "/admin"),
        (http::Version::HTTP_2, "/api"),
        (http::Version::HTTP_2, "/admin"),
    ] {
        let uri = if version == http::Version::HTTP_2 {
            format!("http://{host}{path}")
        } else {
            path.to_string()
        };
        let req = http::Request::builder()
            .uri(uri)
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = if version == http::Version::HTTP_2 {
            h2.ready().await.unwrap();
            h2.send_request(req).await.unwrap()
        } else {
            h1.ready().await.unwrap();
            h1.send_request(req).await.unwrap()
        };
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        answers.push((path, status, body));
    }
    assert_eq!(answers[0].1, 200, "HTTP/1.1 /api");
    assert_eq!(answers[2].1, 200, "HTTP/2 /api");
    assert_eq!(answers[1].1, 403, "HTTP/1.1 /admin");
    assert_eq!(
        (answers[1].1, &answers[1].2),
        (answers[3].1, &answers[3].2),
        "the refusals differ (HTTP/1.1, then HTTP/2)"
    );

    let entries = eventually("four access-log entries", || async {
        let e = h.http_entries();
        (e.len() == 4).then_some(e)
    })
    .await;
    let denied: Vec<&serde_json::Value> =
        entries.iter().filter(|e| e["path"] == "/admin").collect();
    assert_eq!(denied.len(), 2, "{entries:?}");
    for field in [
        "response_code",
        "response_flags",
        "decision",
        "reason",
        "policy",
        "rule",
    ] {
        assert_eq!(
            denied[0][field], denied[1][field],
            "{field} differs between HTTP/1.1 and HTTP/2: {denied:?}"
        );
    }
    let d = denied[0];
    assert_eq!(
        (
            &d["decision"],
            &d["reason"],
            &d["policy"],
            &d["response_code"],
            &d["response_flags"]
        ),
        (
            &serde_json::json!("deny"),
            &serde_json::json!("deny_matched"),
            &serde_json::json!("production/no-admin"),
            &serde_json::json!(403),
            &serde_json::json!("-"),
        ),
        "{d}"
    );
}

/// A mesh workload's HTTP/2 server (mTLS with `certs`, ALPN `h2`) that
/// answers one request per connection and then closes it, so that every
/// request after the first comes on a new connection; it records the
/// leaf certificate each client presented, in order.
struct MeshH2Server {
    addr: SocketAddr,
    clients: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl MeshH2Server {
    async fn start(certs: &WorkloadCerts) -> MeshH2Server {
        use meshward_identity::verify::TrustDomains;
        let creds = meshward_identity::WorkloadCredentials::from_dir(&certs.dir).unwrap();
        let bundle = meshward_identity::TrustBundle::from_pem_file(&certs.root()).unwrap();
        let verifier = meshward_identity::SvidVerifier::new(bundle, TrustDomains::any());
        let mut config = meshward_identity::server_config(
            verifier,
            meshward_identity::CredentialResolver::fixed(creds),
        )
        .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let clients = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&clients);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let seen = Arc::clone(&seen);
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    if let Some(leaf) = tls.get_ref().1.peer_certificates().and_then(|c| c.first())
                    {
                        seen.lock().unwrap().push(leaf.to_vec());
                    }
                    serve_one_h2(tls).await;
                });
            }
        });
        MeshH2Server { addr, clients }
    }

    /// The certificate the last client presented.
    fn last_client(&self) -> Option<Vec<u8>> {
        self.clients.lock().unwrap().last().cloned()
    }
}

/// Serves HTTP/2 on `io` until one request is answered, then closes the
/// connection gracefully (GOAWAY).
async fn serve_one_h2<T>(io: T)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (done, answered) = tokio::sync::oneshot::channel::<()>();
    let done = Mutex::new(Some(done));
    let svc = hyper::service::service_fn(move |_req| {
        if let Some(done) = done.lock().unwrap().take() {
            let _ = done.send(());
        }
        async {
            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(
                b"ratings",
            ))))
        }
    });
    let conn = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = answered => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// After a certificate rotation, a new outbound connection to an HTTP/2
/// (gRPC) service presents the new certificate. (Connections through
/// hyper's client once kept the client config their pool key was first
/// registered with, so they presented the old certificate, and would
/// have until it expired.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_outbound_h2_connection_presents_the_rotated_certificate() {
    let h = Harness::start("").await;
    let ratings = MeshH2Server::start(&h.issue("ratings")).await;
    h.push(&format!(
        "{}{}",
        WorkloadEntry::new(NS, "ratings")
            .port("grpc", ratings.addr.port())
            .yaml(),
        mesh::service_entry(
            NS,
            "ratings",
            "ratings",
            "{number: 9090, name: grpc, protocol: GRPC}"
        ),
    ));
    let host = "ratings.production.svc.cluster.local:9090";
    let through = || async {
        get(h.outbound, host, "/", &[])
            .await
            .filter(|(status, body)| *status == 200 && body == "ratings")
    };
    eventually("a request through to ratings", through).await;
    assert_eq!(ratings.last_client(), Some(leaf_of(&orders_now(&h))));

    let renewed = h.issue("orders");
    push_credentials(&h.source, &renewed).unwrap();
    let want = leaf_of(&renewed);
    eventually(
        "the renewed certificate on a new upstream connection",
        || async {
            through().await?;
            (ratings.last_client() == Some(want.clone())).then_some(())
        },
    )
    .await;
}

/// A configuration published right after the proxy started is applied:
/// it was once marked seen by the applier's first look at the channel and
/// never applied (a DENY pushed at once stayed unenforced until the next
/// change). Several proxies, since it depended on which task ran first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_pushed_right_after_the_start_is_enforced() {
    for round in 0..24 {
        let h = Harness::start("").await;
        h.push(&deny_from("frontend"));
        let frontend = h.issue("frontend");
        eventually(&format!("round {round}: the DENY enforced"), || async {
            let mut c = h.connect_as(&frontend).await;
            echo_back(&mut c, "ping").await.is_err().then_some(())
        })
        .await;
    }
}
