use super::*;
use jsonwebtoken::{EncodingKey, Header};
use meshward_test_support::jwt::es256;
use serde_json::json;

const ISS: &str = "https://issuer.example.com";

fn sign(key: &EncodingKey, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(extra: Value) -> Value {
    let mut c = json!({"iss": ISS, "sub": "alice", "exp": now() + 3600});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

/// A policy from the `jwtRules` entries given as YAML flow mappings.
fn policy_with(rules: &[String], jwks: &JwksStore) -> JwtPolicy {
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: prod}}\nspec:\n  jwtRules:\n{}",
        rules
            .iter()
            .map(|r| format!("  - {r}\n"))
            .collect::<String>()
    );
    let mut loader = meshward_config::Loader::new();
    loader.add_source("test.yaml", &yaml);
    let config = loader.finish().unwrap_or_else(|d| panic!("{d}")).config;
    JwtPolicy::compile(&config.request_authentications, jwks)
}

fn rule(jwks: &[&Value], extra: &str) -> String {
    let set = json!({ "keys": jwks }).to_string();
    format!(
        "{{issuer: \"{ISS}\", jwks: {}{extra}}}",
        serde_json::to_string(&set).unwrap()
    )
}

struct Req(Vec<(&'static str, String)>);

impl Headers for Req {
    fn header(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        meshward_policy::join_values(
            self.0
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_bytes()),
        )
    }
}

/// Headers whose values are raw bytes.
struct RawReq(Vec<(&'static str, Vec<u8>)>);

impl Headers for RawReq {
    fn header(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        meshward_policy::join_values(
            self.0
                .iter()
                .filter(|(n, _)| *n == name)
                .map(|(_, v)| v.as_slice()),
        )
    }
}

fn bearer(token: &str) -> Req {
    Req(vec![("authorization", format!("Bearer {token}"))])
}

fn refused(r: Result<Authenticated, Rejected>) -> &'static str {
    r.expect_err("the token should be refused").message
}

#[test]
fn a_token_header_with_bytes_that_are_not_utf8_is_refused_not_skipped() {
    let (key, jwk) = es256("k1");
    let p = policy_with(&[rule(&[&jwk], "")], &JwksStore::default());
    let token = sign(&key, Algorithm::ES256, Some("k1"), &claims(json!({})));
    // A valid token followed by one byte that is not UTF-8: refused,
    // never treated as "no token" (the header would be forwarded).
    let mut value = format!("Bearer {token} ").into_bytes();
    value.push(0xff);
    let req = RawReq(vec![("authorization", value)]);
    assert_eq!(refused(p.authenticate(&req, "/")), status::SIGNATURE);
    let tampered = format!("Bearer {}x", &token[..token.len() - 1]).into_bytes();
    let mut bad = tampered.clone();
    bad.extend_from_slice(b" \xff");
    bad.push(0xff);
    assert!(
        p.authenticate(&RawReq(vec![("authorization", bad)]), "/")
            .is_err()
    );
    // In a cookie location too.
    let p = policy_with(
        &[rule(&[&jwk], ", fromCookies: [session]")],
        &JwksStore::default(),
    );
    let mut cookie = format!("session={token}").into_bytes();
    cookie.push(0xfe);
    assert!(
        p.authenticate(&RawReq(vec![("cookie", cookie)]), "/")
            .is_err()
    );
}

#[test]
fn without_rules_nothing_is_checked_or_removed() {
    let p = JwtPolicy::default();
    let a = p.authenticate(&bearer("garbage"), "/").unwrap();
    assert!(a.auth.is_none() && a.remove.is_empty() && a.add.is_empty());
}

#[test]
fn a_valid_token_gives_its_principal_and_is_not_forwarded() {
    let (key, jwk) = es256("k1");
    let p = policy_with(&[rule(&[&jwk], "")], &JwksStore::default());
    let token = sign(
        &key,
        Algorithm::ES256,
        Some("k1"),
        &claims(json!({"aud": "shop"})),
    );
    let a = p.authenticate(&bearer(&token), "/").unwrap();
    let auth = a.auth.unwrap();
    assert_eq!(auth.principal(), format!("{ISS}/alice"));
    assert_eq!(auth.audiences, ["shop"]);
    assert_eq!(a.remove, ["authorization"]);
    // `bearer` in any case, and the query parameter `access_token`.
    let lower = Req(vec![("authorization", format!("bearer {token}"))]);
    assert!(p.authenticate(&lower, "/").unwrap().auth.is_some());
    let a = p
        .authenticate(&Req(vec![]), &format!("/x?a=1&access_token={token}"))
        .unwrap();
    assert!(a.auth.is_some());
    assert!(a.remove.is_empty(), "query parameters stay");
    // forwardOriginalToken keeps the header.
    let p = policy_with(
        &[rule(&[&jwk], ", forwardOriginalToken: true")],
        &JwksStore::default(),
    );
    assert!(
        p.authenticate(&bearer(&token), "/")
            .unwrap()
            .remove
            .is_empty()
    );
}

#[test]
fn a_request_without_a_token_passes_unauthenticated() {
    let (_, jwk) = es256("k1");
    let p = policy_with(&[rule(&[&jwk], "")], &JwksStore::default());
    for req in [
        Req(vec![]),
        Req(vec![("authorization", "Basic dXNlcjpwYXNz".into())]),
        Req(vec![("authorization", "Bearer ".into())]),
    ] {
        assert!(
            p.authenticate(&req, "/?access_token=")
                .unwrap()
                .auth
                .is_none()
        );
    }
}

#[test]
fn bad_tokens_are_refused_with_envoys_messages() {
    let (key, jwk) = es256("k1");
    let (other, _) = es256("k1");
    let p = policy_with(
        &[rule(&[&jwk], ", audiences: [shop]")],
        &JwksStore::default(),
    );
    let t = |c: Value| sign(&key, Algorithm::ES256, Some("k1"), &c);
    let aud = json!({"aud": "shop"});
    let check = |token: &str| refused(p.authenticate(&bearer(token), "/"));
    assert_eq!(check("abc"), status::MALFORMED);
    assert_eq!(check("a.b.c.d"), status::MALFORMED);
    assert_eq!(check("e30.e30.sig"), status::BAD_HEADER);
    let good = t(claims(aud.clone()));
    let header = good.split('.').next().unwrap();
    assert_eq!(check(&format!("{header}.!!!.sig")), status::BAD_PAYLOAD);
    // An issuer no rule names.
    let r = p
        .authenticate(
            &bearer(&t(json!({"iss": "https://evil", "aud": "shop"}))),
            "/",
        )
        .unwrap_err();
    assert_eq!((r.message, r.policy), (status::UNKNOWN_ISSUER, None));
    // Time, with Envoy's 60 s of clock skew.
    let expired = json!({"exp": now() - 120, "aud": "shop"});
    let r = p
        .authenticate(&bearer(&t(claims(expired))), "/")
        .unwrap_err();
    assert_eq!(
        (r.message, r.policy.as_deref()),
        (status::EXPIRED, Some("prod/jwt"))
    );
    assert!(
        p.authenticate(
            &bearer(&t(claims(json!({"exp": now() - 30, "aud": "shop"})))),
            "/"
        )
        .is_ok()
    );
    let early = json!({"nbf": now() + 600, "aud": "shop"});
    assert_eq!(check(&t(claims(early))), status::NOT_YET_VALID);
    assert_eq!(
        check(&t(claims(json!({"exp": "soon", "aud": "shop"})))),
        status::BAD_PAYLOAD
    );
    // Audiences.
    assert_eq!(check(&t(claims(json!({"aud": "admin"})))), status::AUDIENCE);
    assert_eq!(check(&t(claims(json!({})))), status::AUDIENCE);
    assert!(
        p.authenticate(
            &bearer(&t(claims(json!({"aud": ["x", "https://shop/"]})))),
            "/"
        )
        .is_ok()
    );
    // Signatures: another key with the same kid, a changed payload.
    let forged = sign(&other, Algorithm::ES256, Some("k1"), &claims(aud.clone()));
    assert_eq!(check(&forged), status::SIGNATURE);
    let mut parts: Vec<&str> = good.split('.').collect();
    let admin = URL_SAFE_NO_PAD.encode(claims(json!({"sub": "admin", "aud": "shop"})).to_string());
    parts[1] = &admin;
    assert_eq!(check(&parts.join(".")), status::SIGNATURE);
    // No key with that kid, or of that algorithm's family: an HMAC
    // token "signed" with the public key's bytes finds no key.
    let unknown_kid = sign(&key, Algorithm::ES256, Some("k2"), &claims(aud.clone()));
    assert_eq!(check(&unknown_kid), status::NO_KEY);
    let x = jwk["x"].as_str().unwrap();
    let hmac = sign(
        &EncodingKey::from_secret(x.as_bytes()),
        Algorithm::HS256,
        Some("k1"),
        &claims(aud),
    );
    assert_eq!(check(&hmac), status::NO_KEY);
    // alg "none" is no algorithm.
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
        good.split('.').nth(1).unwrap()
    );
    assert_eq!(check(&none), status::BAD_HEADER);
}

#[test]
fn every_token_must_be_valid() {
    let (key, jwk) = es256("k1");
    let p = policy_with(&[rule(&[&jwk], "")], &JwksStore::default());
    let good = sign(&key, Algorithm::ES256, Some("k1"), &claims(json!({})));
    let r = p.authenticate(&bearer(&good), "/?access_token=forged.token.here");
    assert_eq!(refused(r), status::BAD_HEADER);
}

#[test]
fn custom_locations_replace_the_default_ones() {
    let (key, jwk) = es256("k1");
    let extra = ", fromHeaders: [{name: x-jwt, prefix: \"Token \"}], fromParams: [jwt], fromCookies: [session]";
    let p = policy_with(&[rule(&[&jwk], extra)], &JwksStore::default());
    let token = sign(&key, Algorithm::ES256, None, &claims(json!({})));
    // The default locations are not read any more.
    assert!(p.authenticate(&bearer(&token), "/").unwrap().auth.is_none());
    let a = p
        .authenticate(&Req(vec![("x-jwt", format!("Token {token}"))]), "/")
        .unwrap();
    assert!(a.auth.is_some());
    assert_eq!(a.remove, ["x-jwt"]);
    assert!(
        p.authenticate(&Req(vec![]), &format!("/?jwt={token}"))
            .unwrap()
            .auth
            .is_some()
    );
    let cookie = Req(vec![("cookie", format!("a=b; session={token}; c=d"))]);
    assert!(p.authenticate(&cookie, "/").unwrap().auth.is_some());
    let wrong_prefix = Req(vec![("x-jwt", format!("Bearer {token}"))]);
    assert!(p.authenticate(&wrong_prefix, "/").unwrap().auth.is_none());
}

#[test]
fn payload_and_claims_go_to_headers_which_clients_cannot_set() {
    let (key, jwk) = es256("k1");
    let extra = ", outputPayloadToHeader: x-jwt-payload, outputClaimToHeaders: [{header: x-sub, claim: sub}, {header: x-admin, claim: admin}, {header: x-n, claim: n}, {header: x-team, claim: org.team}, {header: x-groups, claim: groups}, {header: x-bad, claim: bad}]";
    let p = policy_with(&[rule(&[&jwk], extra)], &JwksStore::default());
    let c = claims(
        json!({"admin": true, "n": 42, "org": {"team": "blue"}, "groups": ["a", "b"], "bad": "x\ny"}),
    );
    let token = sign(&key, Algorithm::ES256, Some("k1"), &c);
    let a = p.authenticate(&bearer(&token), "/").unwrap();
    let add: HashMap<&str, &str> = a
        .add
        .iter()
        .map(|(h, v)| (h.as_str(), v.as_str()))
        .collect();
    let payload = URL_SAFE_NO_PAD.decode(add["x-jwt-payload"]).unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&payload).unwrap(), c);
    assert_eq!(add["x-sub"], "alice");
    assert_eq!(add["x-admin"], "true");
    assert_eq!(add["x-n"], "42");
    assert_eq!(add["x-team"], "blue");
    assert_eq!(STANDARD.decode(add["x-groups"]).unwrap(), br#"["a","b"]"#);
    assert!(
        !add.contains_key("x-bad"),
        "a value with a newline is not output"
    );
    // Without a token, the output headers a client sent are still removed.
    let a = p
        .authenticate(&Req(vec![("x-sub", "admin".into())]), "/")
        .unwrap();
    for h in [
        "x-jwt-payload",
        "x-sub",
        "x-admin",
        "x-n",
        "x-team",
        "x-groups",
        "x-bad",
    ] {
        assert!(a.remove.iter().any(|r| r == h), "{h}: {:?}", a.remove);
    }
}

#[test]
fn hmac_keys_and_several_issuers() {
    let secret = b"a shared secret of enough length!";
    let oct = json!({"kty": "oct", "k": URL_SAFE_NO_PAD.encode(secret), "alg": "HS256"});
    let (key, jwk) = es256("k1");
    let other = format!(
        "{{issuer: other, jwks: {}}}",
        serde_json::to_string(&json!({"keys": [oct]}).to_string()).unwrap()
    );
    let p = policy_with(&[rule(&[&jwk], ""), other], &JwksStore::default());
    let hs = sign(
        &EncodingKey::from_secret(secret),
        Algorithm::HS256,
        None,
        &json!({"iss": "other", "sub": "bob"}),
    );
    assert_eq!(
        p.authenticate(&bearer(&hs), "/")
            .unwrap()
            .auth
            .unwrap()
            .principal(),
        "other/bob"
    );
    let es = sign(&key, Algorithm::ES256, None, &claims(json!({})));
    assert!(p.authenticate(&bearer(&es), "/").is_ok());
    // A token of the first issuer is not checked with the second's keys.
    let crossed = sign(
        &EncodingKey::from_secret(secret),
        Algorithm::HS256,
        None,
        &claims(json!({})),
    );
    assert_eq!(
        refused(p.authenticate(&bearer(&crossed), "/")),
        status::NO_KEY
    );
}

#[test]
fn a_jwks_uri_not_fetched_yet_refuses_its_tokens() {
    let (key, _) = es256("k1");
    let store = JwksStore::default();
    let p = policy_with(
        &[format!(
            "{{issuer: \"{ISS}\", jwksUri: \"http://127.0.0.1:9/jwks\"}}"
        )],
        &store,
    );
    let token = sign(&key, Algorithm::ES256, None, &claims(json!({})));
    assert_eq!(
        refused(p.authenticate(&bearer(&token), "/")),
        status::FETCH_FAILED
    );
    // Both snapshots share one slot per URI.
    assert!(Arc::ptr_eq(
        &store.get("http://127.0.0.1:9/jwks"),
        &store.get("http://127.0.0.1:9/jwks")
    ));
}

/// A `jwksUri` Istio applies but whose keys can never be fetched (no
/// host, a port above 65535): the fetch fails without harm and the
/// issuer's tokens are refused, as Istio refuses them.
#[tokio::test]
async fn a_jwks_uri_that_cannot_be_fetched_refuses_its_tokens() {
    let (key, _) = es256("k1");
    for uri in [
        "https:///keys",
        "https:keys.example/jwks",
        "http://127.0.0.1:99999/jwks",
    ] {
        let store = JwksStore::default();
        let p = policy_with(
            &[format!("{{issuer: \"{ISS}\", jwksUri: \"{uri}\"}}")],
            &store,
        );
        store.fetch_due().await;
        let token = sign(&key, Algorithm::ES256, None, &claims(json!({})));
        assert_eq!(
            refused(p.authenticate(&bearer(&token), "/")),
            status::FETCH_FAILED,
            "{uri}"
        );
        let retry = *store.get(uri).due.lock().unwrap() - Instant::now();
        assert!(retry <= JWKS_RETRY, "{uri}: {retry:?}");
    }
}

/// A JWKS endpoint whose answer (status, body) the test sets.
async fn jwks_endpoint(answer: Arc<Mutex<(u16, String)>>) -> String {
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let answer = Arc::clone(&answer);
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    let (status, body) = answer.lock().unwrap().clone();
                    async move {
                        let mut resp = http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(body),
                        ));
                        *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}/jwks.json")
}

#[tokio::test]
async fn a_jwks_uri_is_fetched_and_a_failed_refresh_keeps_the_last_keys() {
    let (key, jwk) = es256("k1");
    let answer = Arc::new(Mutex::new((503, String::new())));
    let uri = jwks_endpoint(Arc::clone(&answer)).await;
    let store = JwksStore::default();
    let p = policy_with(
        &[format!("{{issuer: \"{ISS}\", jwksUri: \"{uri}\"}}")],
        &store,
    );
    let token = sign(&key, Algorithm::ES256, None, &claims(json!({})));
    let check = || {
        p.authenticate(&bearer(&token), "/")
            .map(|a| a.auth.is_some())
    };
    let due_now = || *store.get(&uri).due.lock().unwrap() = Instant::now();

    // The endpoint fails: tokens are refused, the fetch is retried soon.
    store.fetch_due().await;
    assert_eq!(check().unwrap_err().message, status::FETCH_FAILED);
    let retry = *store.get(&uri).due.lock().unwrap() - Instant::now();
    assert!(retry <= JWKS_RETRY, "{retry:?}");
    // It answers: the same policy now has the keys, until the refresh.
    *answer.lock().unwrap() = (200, json!({"keys": [jwk]}).to_string());
    due_now();
    store.fetch_due().await;
    assert_eq!(check(), Ok(true));
    let refresh = *store.get(&uri).due.lock().unwrap() - Instant::now();
    assert!(
        refresh > JWKS_RETRY && refresh <= JWKS_REFRESH,
        "{refresh:?}"
    );
    // Garbage, an error or an oversized document later: the last keys stay.
    for bad in [
        (200, "not json".to_string()),
        (500, String::new()),
        (
            200,
            format!(
                "{{\"keys\": [], \"pad\": \"{}\"}}",
                "x".repeat(JWKS_MAX_BYTES)
            ),
        ),
    ] {
        *answer.lock().unwrap() = bad;
        due_now();
        store.fetch_due().await;
        assert_eq!(check(), Ok(true));
    }
    // New keys replace the old ones: the token (no `kid`) is checked
    // against the new key only.
    let (_, other) = es256("k2");
    *answer.lock().unwrap() = (200, json!({"keys": [other]}).to_string());
    due_now();
    store.fetch_due().await;
    assert_eq!(check().unwrap_err().message, status::SIGNATURE);
}

#[tokio::test]
async fn a_jwks_server_whose_certificate_is_not_trusted_is_refused() {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let key = rustls_pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let handshakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = Arc::clone(&handshakes);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            // The client gives up during the handshake; a completed
            // one would be counted.
            if acceptor.accept(s).await.is_ok() {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    let err = fetch(
        &fetch_client(),
        &format!("https://localhost:{port}/jwks.json"),
    )
    .await
    .unwrap_err();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    assert_eq!(handshakes.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[test]
fn verified_signatures_are_remembered_within_bounds() {
    let (key, jwk) = es256("k1");
    let p = policy_with(&[rule(&[&jwk], "")], &JwksStore::default());
    let tokens: Vec<String> = (0..SIGNATURE_CACHE_SIZE + 20)
        .map(|i| sign(&key, Algorithm::ES256, None, &claims(json!({"n": i}))))
        .collect();
    for t in &tokens {
        assert!(p.authenticate(&bearer(t), "/").unwrap().auth.is_some());
    }
    let cached = p.signatures.0.lock().unwrap().len();
    assert_eq!(cached, SIGNATURE_CACHE_SIZE);
    // A remembered token still passes every other check each time.
    let last = tokens.last().unwrap();
    assert!(p.signatures.verified(
        last,
        match &p.providers[0].keys {
            Keys::Inline(Ok(k)) => k,
            _ => unreachable!("inline keys"),
        }
    ));
    let a = p.authenticate(&bearer(last), "/").unwrap().auth.unwrap();
    assert_eq!(a.claims["n"], SIGNATURE_CACHE_SIZE + 19);
    // A bad token is never remembered.
    let (other, _) = es256("k1");
    let forged = sign(&other, Algorithm::ES256, None, &claims(json!({})));
    for _ in 0..2 {
        assert_eq!(
            refused(p.authenticate(&bearer(&forged), "/")),
            status::SIGNATURE
        );
    }
}

#[test]
fn unusable_jwks_refuse_their_tokens() {
    let (key, _) = es256("k1");
    let junk = json!({"kty": "RSA", "n": "!", "e": "AQAB"});
    let p = policy_with(&[rule(&[&junk], "")], &JwksStore::default());
    let token = sign(&key, Algorithm::ES256, None, &claims(json!({})));
    assert_eq!(
        refused(p.authenticate(&bearer(&token), "/")),
        status::NO_KEY
    );
    assert!(parse_jwks(r#"{"keys": []}"#).is_err());
    assert!(parse_jwks("[]").is_err());
}

#[test]
fn the_challenge_names_the_request_without_its_query() {
    assert_eq!(
        challenge("shop", "/api?access_token=x"),
        r#"Bearer realm="http://shop/api", error="invalid_token""#
    );
    // Nothing that could end the quoted realm or the header line.
    assert_eq!(
        challenge("a\"b", "/p\"q\\\r\n"),
        r#"Bearer realm="http://ab/pq", error="invalid_token""#
    );
}
