//! RequestAuthentication: JWT validation on the inbound HTTP path, as
//! Envoy's `jwt_authn` filter does it in an Istio sidecar.
//!
//! Every RequestAuthentication that applies to the workload contributes
//! its `jwtRules` (they are merged, not ranked). A request with no token
//! at any configured location passes unauthenticated (authorization then
//! decides); a request with a token that fails validation is answered
//! `401` with Envoy's message; a request whose tokens are all valid
//! carries the first one's claims into authorization (`requestPrincipals`
//! and `request.auth.*`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use meshward_config::Resource;
use meshward_config::model::{JwtRule, RequestAuthentication};
use meshward_policy::{Headers, JwtAuth};
use serde_json::{Map, Value};

/// Allowed clock skew for `exp` and `nbf`, as Envoy's default.
const CLOCK_SKEW_SECS: u64 = 60;

/// Envoy's messages (the `401` body) for each way a token can fail.
pub mod status {
    pub const MALFORMED: &str =
        "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections";
    pub const BAD_HEADER: &str = "Jwt header is an invalid JSON";
    pub const BAD_PAYLOAD: &str = "Jwt payload is an invalid JSON";
    pub const UNKNOWN_ISSUER: &str = "Jwt issuer is not configured";
    pub const NOT_YET_VALID: &str = "Jwt not yet valid";
    pub const EXPIRED: &str = "Jwt is expired";
    pub const AUDIENCE: &str = "Audiences in Jwt are not allowed";
    pub const NO_KEY: &str = "Jwks doesn't have key to match kid or alg from Jwt";
    pub const FETCH_FAILED: &str = "Jwks remote fetch is failed";
    pub const SIGNATURE: &str = "Jwt verification fails";
}

/// Where a token may be found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    /// A header (lower-case name); the token follows `prefix`, matched
    /// without regard to case (`Bearer `).
    Header { name: String, prefix: String },
    /// A query parameter.
    Param(String),
    /// A cookie.
    Cookie(String),
}

impl Location {
    /// The token at this location of a request, if any.
    fn extract<'r>(&self, headers: &'r dyn Headers, query: &'r str) -> Option<Cow<'r, str>> {
        match self {
            Location::Header { name, prefix } => {
                // A value that is not UTF-8 is taken with its bad bytes
                // replaced: never a valid token, so it is refused (401),
                // not skipped and forwarded unchecked.
                let value = lossy(headers.header(name)?);
                let strip = |v: &str| -> Option<usize> {
                    let head = v.get(..prefix.len())?;
                    head.eq_ignore_ascii_case(prefix).then_some(prefix.len())
                };
                let token = match value {
                    Cow::Borrowed(v) => Cow::Borrowed(v[strip(v)?..].trim()),
                    Cow::Owned(v) => Cow::Owned(v[strip(&v)?..].trim().to_string()),
                };
                (!token.is_empty()).then_some(token)
            }
            Location::Param(name) => query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| k == name)
                .map(|(_, v)| Cow::Borrowed(v))
                .filter(|v| !v.is_empty()),
            Location::Cookie(name) => {
                let cookies = lossy(headers.header("cookie")?);
                let value = cookies
                    .split(';')
                    .filter_map(|c| c.trim().split_once('='))
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.trim_matches('"').to_string())?;
                (!value.is_empty()).then_some(Cow::Owned(value))
            }
        }
    }
}

/// A header value as text, bytes that are not UTF-8 replaced (U+FFFD).
fn lossy(value: Cow<'_, [u8]>) -> Cow<'_, str> {
    match value {
        Cow::Borrowed(v) => String::from_utf8_lossy(v),
        Cow::Owned(v) => match String::from_utf8(v) {
            Ok(s) => Cow::Owned(s),
            Err(e) => Cow::Owned(String::from_utf8_lossy(e.as_bytes()).into_owned()),
        },
    }
}

/// One usable key of a JWKS.
#[derive(Clone)]
struct Key {
    kid: Option<String>,
    /// The key's `alg`, when the JWKS names one.
    alg: Option<Algorithm>,
    key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl Key {
    fn fits(&self, alg: Algorithm, kid: Option<&str>) -> bool {
        kid.is_none_or(|kid| self.kid.as_deref() == Some(kid))
            && self.alg.is_none_or(|a| a == alg)
            && self.key.family() == alg.family()
    }
}

/// Parses a JWKS document into the keys meshward can verify with; keys
/// of a kind it cannot use are skipped (and counted in the error when
/// none is left).
fn parse_jwks(text: &str) -> Result<Vec<Key>, String> {
    let set: Value =
        serde_json::from_str(text).map_err(|e| format!("not a JSON Web Key Set: {e}"))?;
    let list = set
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("not a JSON Web Key Set: no \"keys\" list")?;
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for (i, k) in list.iter().enumerate() {
        let one = serde_json::from_value::<JwkSet>(serde_json::json!({ "keys": [k] }))
            .map_err(|e| e.to_string())
            .and_then(|s| {
                let jwk = s.keys.into_iter().next().ok_or("empty")?;
                let key = DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())?;
                let alg = match jwk.common.key_algorithm {
                    Some(a) => Some(Algorithm::try_from(a).map_err(|e| e.to_string())?),
                    None => None,
                };
                Ok(Key {
                    kid: jwk.common.key_id,
                    alg,
                    key,
                })
            });
        match one {
            Ok(key) => keys.push(key),
            Err(e) => skipped.push(format!("key {i}: {e}")),
        }
    }
    if keys.is_empty() {
        return Err(format!(
            "no usable key in the JSON Web Key Set ({})",
            if skipped.is_empty() {
                "it is empty".to_string()
            } else {
                skipped.join("; ")
            }
        ));
    }
    if !skipped.is_empty() {
        tracing::warn!(target: "meshward::jwt", skipped = %skipped.join("; "), "JWKS keys skipped");
    }
    Ok(keys)
}

/// A JWKS fetched from a `jwksUri`, shared by every snapshot that names
/// the URI and refreshed in the background ([`JwksStore::run`]).
#[derive(Debug)]
pub struct RemoteJwks {
    uri: String,
    /// The last keys fetched; `None` until the first fetch succeeds.
    keys: RwLock<Option<Arc<Vec<Key>>>>,
    /// When the next fetch is due.
    due: Mutex<Instant>,
}

impl RemoteJwks {
    fn keys(&self) -> Option<Arc<Vec<Key>>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The keys of one provider.
#[derive(Debug, Clone)]
enum Keys {
    /// Inline `jwks` (or the reason it has no usable key).
    Inline(Result<Arc<Vec<Key>>, String>),
    Remote(Arc<RemoteJwks>),
}

/// One `jwtRules` entry, compiled.
#[derive(Debug, Clone)]
struct Provider {
    /// The RequestAuthentication it comes from (`namespace/name`).
    policy: String,
    issuer: String,
    audiences: Vec<String>,
    keys: Keys,
    locations: Vec<Location>,
    forward: bool,
    payload_header: Option<String>,
    claim_headers: Vec<(String, String)>,
}

impl Provider {
    fn compile(policy: &str, rule: &JwtRule, jwks: &JwksStore) -> Provider {
        let mut locations: Vec<Location> = rule
            .from_headers
            .iter()
            .map(|h| Location::Header {
                name: h.name.to_ascii_lowercase(),
                prefix: h.prefix.clone(),
            })
            .chain(rule.from_params.iter().cloned().map(Location::Param))
            .chain(rule.from_cookies.iter().cloned().map(Location::Cookie))
            .collect();
        if locations.is_empty() {
            locations = vec![
                Location::Header {
                    name: "authorization".into(),
                    prefix: "Bearer ".into(),
                },
                Location::Param("access_token".into()),
            ];
        }
        let keys = match (&rule.jwks, &rule.jwks_uri) {
            (Some(text), _) => Keys::Inline(parse_jwks(text).map(Arc::new)),
            (None, Some(uri)) => Keys::Remote(jwks.get(uri)),
            (None, None) => Keys::Inline(Err("no jwks or jwksUri".into())),
        };
        if let Keys::Inline(Err(e)) = &keys {
            tracing::warn!(target: "meshward::jwt", policy, issuer = %rule.issuer, "tokens of this issuer will be refused: {e}");
        }
        Provider {
            policy: policy.to_string(),
            issuer: rule.issuer.clone(),
            audiences: rule.audiences.clone(),
            keys,
            locations,
            forward: rule.forward_original_token,
            payload_header: rule
                .output_payload_to_header
                .as_ref()
                .map(|h| h.to_ascii_lowercase()),
            claim_headers: rule
                .output_claim_to_headers
                .iter()
                .map(|c| (c.header.to_ascii_lowercase(), c.claim.clone()))
                .collect(),
        }
    }

    /// Whether this provider takes a token of issuer `iss` found at `at`
    /// (a provider without an issuer takes any, as Envoy's does).
    fn takes(&self, iss: &str, at: &Location) -> bool {
        (self.issuer.is_empty() || self.issuer == iss) && self.locations.contains(at)
    }
}

/// How a request fared.
#[derive(Debug, Default)]
pub struct Authenticated {
    /// The first token's facts, when the request carried valid tokens.
    pub auth: Option<Box<JwtAuth>>,
    /// Header names to remove before the request goes on: tokens that are
    /// not forwarded, and every output header (a client cannot set them).
    pub remove: Vec<String>,
    /// Headers to add (payload and claims of valid tokens).
    pub add: Vec<(String, String)>,
}

/// A request refused with `401`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Envoy's message, the response body.
    pub message: &'static str,
    /// The RequestAuthentication whose rule refused it (none when no rule
    /// knows the token's issuer).
    pub policy: Option<String>,
}

/// How many verified signatures a `JwtPolicy` remembers (Envoy's JWT
/// cache keeps 100 tokens by default).
pub const SIGNATURE_CACHE_SIZE: usize = 100;

/// Tokens whose signature was verified recently, with the key set that
/// verified them: a client that sends the same token again (the usual
/// case: a token lives minutes to hours) pays the signature check once,
/// as with Envoy's JWT cache. Only the signature is cached; the form,
/// issuer, time and audience checks run on every request, and an entry
/// counts only while its issuer still has the same key set.
#[derive(Debug, Default)]
struct SignatureCache(Mutex<HashMap<String, Arc<Vec<Key>>>>);

impl SignatureCache {
    fn verified(&self, token: &str, keys: &Arc<Vec<Key>>) -> bool {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(token).is_some_and(|k| Arc::ptr_eq(k, keys))
    }

    fn insert(&self, token: &str, keys: &Arc<Vec<Key>>) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= SIGNATURE_CACHE_SIZE
            && let Some(old) = map.keys().next().cloned()
        {
            map.remove(&old);
        }
        map.insert(token.to_string(), Arc::clone(keys));
    }
}

/// The JWT rules of one workload.
#[derive(Debug, Clone, Default)]
pub struct JwtPolicy {
    providers: Vec<Provider>,
    /// Every location any provider reads, once.
    locations: Vec<Location>,
    /// Output header names, removed from every incoming request.
    outputs: Vec<String>,
    signatures: Arc<SignatureCache>,
}

impl JwtPolicy {
    pub fn compile<'a>(
        policies: impl IntoIterator<Item = &'a Resource<RequestAuthentication>>,
        jwks: &JwksStore,
    ) -> JwtPolicy {
        let mut p = JwtPolicy::default();
        for ra in policies {
            let name = format!("{}/{}", ra.meta.namespace, ra.meta.name);
            for rule in &ra.spec.jwt_rules {
                let provider = Provider::compile(&name, rule, jwks);
                for l in &provider.locations {
                    if !p.locations.contains(l) {
                        p.locations.push(l.clone());
                    }
                }
                let outputs = provider
                    .payload_header
                    .iter()
                    .chain(provider.claim_headers.iter().map(|(h, _)| h));
                for h in outputs {
                    if !p.outputs.contains(h) {
                        p.outputs.push(h.clone());
                    }
                }
                p.providers.push(provider);
            }
        }
        p
    }

    pub fn is_empty(&self) -> bool {
        self.providers.is_empty()
    }

    /// The rules as `/config_dump` shows them: where tokens are read, and
    /// the state of each issuer's keys.
    pub fn describe(&self) -> Vec<Value> {
        self.providers
            .iter()
            .map(|p| {
                let locations: Vec<String> = p
                    .locations
                    .iter()
                    .map(|l| match l {
                        Location::Header { name, prefix } if prefix.is_empty() => {
                            format!("header {name}")
                        }
                        Location::Header { name, prefix } => {
                            format!("header {name} after \"{prefix}\"")
                        }
                        Location::Param(n) => format!("query {n}"),
                        Location::Cookie(n) => format!("cookie {n}"),
                    })
                    .collect();
                let keys = match &p.keys {
                    Keys::Inline(Ok(k)) => serde_json::json!({"source": "inline", "keys": k.len()}),
                    Keys::Inline(Err(e)) => serde_json::json!({"source": "inline", "keys": 0, "error": e}),
                    Keys::Remote(r) => match r.keys() {
                        Some(k) => serde_json::json!({"source": r.uri, "keys": k.len()}),
                        None => serde_json::json!({"source": r.uri, "keys": 0, "error": "not fetched yet (see the log)"}),
                    },
                };
                serde_json::json!({
                    "policy": p.policy,
                    "issuer": p.issuer,
                    "audiences": p.audiences,
                    "locations": locations,
                    "jwks": keys,
                    "forward_original_token": p.forward,
                })
            })
            .collect()
    }

    /// Validates the tokens of a request (`headers`, and `target`'s query).
    /// Every token found must be valid; the first gives the facts. Without
    /// rules this is a test and an empty result, inlined into the caller.
    #[inline]
    pub fn authenticate(
        &self,
        headers: &dyn Headers,
        target: &str,
    ) -> Result<Authenticated, Rejected> {
        if self.providers.is_empty() {
            return Ok(Authenticated::default());
        }
        self.check_tokens(headers, target)
    }

    fn check_tokens(&self, headers: &dyn Headers, target: &str) -> Result<Authenticated, Rejected> {
        let mut out = Authenticated {
            remove: self.outputs.clone(),
            ..Authenticated::default()
        };
        let query = target.split_once('?').map_or("", |(_, q)| q);
        let query = query.split_once('#').map_or(query, |(q, _)| q);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for at in &self.locations {
            let Some(token) = at.extract(headers, query) else {
                continue;
            };
            let (provider, claims, payload) = self.verify(&token, at, now)?;
            if !provider.forward
                && let Location::Header { name, .. } = at
                && !out.remove.contains(name)
            {
                out.remove.push(name.clone());
            }
            if let Some(h) = &provider.payload_header {
                out.add.push((h.clone(), payload.to_string()));
            }
            for (header, claim) in &provider.claim_headers {
                if let Some(v) = claim_header_value(&claims, claim) {
                    out.add.push((header.clone(), v));
                }
            }
            if out.auth.is_none() {
                out.auth = Some(Box::new(JwtAuth::from_claims(claims)));
            }
        }
        Ok(out)
    }

    /// Verifies one token found at `at`: its provider, claims and the
    /// payload segment as it came.
    fn verify<'t>(
        &self,
        token: &'t str,
        at: &Location,
        now: u64,
    ) -> Result<(&Provider, Map<String, Value>, &'t str), Rejected> {
        let reject = |message, policy: Option<&Provider>| Rejected {
            message,
            policy: policy.map(|p| p.policy.clone()),
        };
        let mut parts = token.split('.');
        let (Some(_), Some(payload), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(reject(status::MALFORMED, None));
        };
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| reject(status::BAD_HEADER, None))?;
        let claims: Map<String, Value> = URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| reject(status::BAD_PAYLOAD, None))?;
        let iss = match claims.get("iss") {
            Some(Value::String(s)) => s.as_str(),
            None => "",
            Some(_) => return Err(reject(status::BAD_PAYLOAD, None)),
        };
        let provider = self
            .providers
            .iter()
            .find(|p| p.takes(iss, at))
            .ok_or_else(|| reject(status::UNKNOWN_ISSUER, None))?;
        let time = |k: &str| match claims.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
                .map(Some)
                .ok_or_else(|| reject(status::BAD_PAYLOAD, Some(provider))),
        };
        if time("nbf")?.is_some_and(|nbf| nbf > now.saturating_add(CLOCK_SKEW_SECS)) {
            return Err(reject(status::NOT_YET_VALID, Some(provider)));
        }
        if time("exp")?.is_some_and(|exp| now > exp.saturating_add(CLOCK_SKEW_SECS)) {
            return Err(reject(status::EXPIRED, Some(provider)));
        }
        if !provider.audiences.is_empty() {
            let token_auds: Vec<&str> = match claims.get("aud") {
                Some(Value::String(a)) => vec![a],
                Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
                _ => Vec::new(),
            };
            let allowed = token_auds
                .iter()
                .any(|a| provider.audiences.iter().any(|c| same_audience(a, c)));
            if !allowed {
                return Err(reject(status::AUDIENCE, Some(provider)));
            }
        }
        let keys = match &provider.keys {
            Keys::Inline(Ok(keys)) => Arc::clone(keys),
            Keys::Inline(Err(_)) => return Err(reject(status::NO_KEY, Some(provider))),
            Keys::Remote(r) => r
                .keys()
                .ok_or_else(|| reject(status::FETCH_FAILED, Some(provider)))?,
        };
        if self.signatures.verified(token, &keys) {
            return Ok((provider, claims, payload));
        }
        let mut validation = Validation::new(header.alg);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        let mut candidates = keys
            .iter()
            .filter(|k| k.fits(header.alg, header.kid.as_deref()))
            .peekable();
        if candidates.peek().is_none() {
            return Err(reject(status::NO_KEY, Some(provider)));
        }
        let verified =
            candidates.any(|k| jsonwebtoken::decode::<Value>(token, &k.key, &validation).is_ok());
        if !verified {
            return Err(reject(status::SIGNATURE, Some(provider)));
        }
        self.signatures.insert(token, &keys);
        Ok((provider, claims, payload))
    }
}

/// Audiences compared as Envoy does: without an `http://` or `https://`
/// scheme and without a trailing `/`.
fn same_audience(a: &str, b: &str) -> bool {
    let norm = |s: &str| {
        let s = s
            .strip_prefix("https://")
            .or_else(|| s.strip_prefix("http://"))
            .unwrap_or(s);
        s.strip_suffix('/').unwrap_or(s).to_string()
    };
    norm(a) == norm(b)
}

/// A claim as a header value (`outputClaimToHeaders`): strings as they
/// are, numbers and booleans written out, objects and lists as base64 of
/// their JSON. Nested claims are named with `.`. A value that cannot be a
/// header value (control characters) is not output.
fn claim_header_value(claims: &Map<String, Value>, claim: &str) -> Option<String> {
    let mut parts = claim.split('.');
    let mut v = claims.get(parts.next()?)?;
    for p in parts {
        v = v.as_object()?.get(p)?;
    }
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
            _ => n.to_string(),
        },
        Value::Object(_) | Value::Array(_) => STANDARD.encode(v.to_string()),
        Value::Null => return None,
    };
    let valid = !text.is_empty() && text.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f));
    valid.then_some(text)
}

/// How often a fetched JWKS is fetched again (Istio's default refresh).
pub const JWKS_REFRESH: Duration = Duration::from_secs(20 * 60);
/// How soon a failed fetch is tried again.
pub const JWKS_RETRY: Duration = Duration::from_secs(5);
/// How long one fetch may take.
pub const JWKS_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document accepted.
pub const JWKS_MAX_BYTES: usize = 1024 * 1024;

/// The JWKS of every `jwksUri` the proxy's configuration names, fetched
/// and refreshed in the background; until a URI's first fetch succeeds,
/// its tokens are refused (`401 Jwks remote fetch is failed`).
#[derive(Debug, Default)]
pub struct JwksStore {
    by_uri: Mutex<HashMap<String, Arc<RemoteJwks>>>,
    wake: tokio::sync::Notify,
    client: std::sync::OnceLock<FetchClient>,
}

impl JwksStore {
    /// The shared slot of `uri`, registered for fetching if new.
    pub fn get(&self, uri: &str) -> Arc<RemoteJwks> {
        let mut map = self.by_uri.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = map.get(uri) {
            return Arc::clone(r);
        }
        let r = Arc::new(RemoteJwks {
            uri: uri.to_string(),
            keys: RwLock::new(None),
            due: Mutex::new(Instant::now()),
        });
        map.insert(uri.to_string(), Arc::clone(&r));
        self.wake.notify_one();
        r
    }

    /// Fetches every URI whose fetch is due, once.
    pub async fn fetch_due(&self) {
        let due: Vec<Arc<RemoteJwks>> = {
            let map = self.by_uri.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            map.values()
                .filter(|r| *r.due.lock().unwrap_or_else(|e| e.into_inner()) <= now)
                .cloned()
                .collect()
        };
        if due.is_empty() {
            return;
        }
        // Built on first use: a proxy with no remote JWKS never holds the
        // roots it would verify servers with.
        let client = self.client.get_or_init(fetch_client);
        for r in due {
            let next = match fetch(client, &r.uri).await {
                Ok(keys) => {
                    tracing::info!(target: "meshward::jwt", uri = %r.uri, keys = keys.len(), "JWKS fetched");
                    *r.keys.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(keys));
                    JWKS_REFRESH
                }
                Err(e) => {
                    // Keys fetched earlier stay in use until a fetch
                    // succeeds again.
                    tracing::warn!(target: "meshward::jwt", uri = %r.uri, "JWKS fetch failed: {e}");
                    JWKS_RETRY
                }
            };
            *r.due.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now() + next;
        }
    }

    /// Fetches every URI when due, for ever: run it on the proxy's runtime.
    pub async fn run(self: Arc<Self>) {
        loop {
            self.fetch_due().await;
            let next_due = {
                let map = self.by_uri.lock().unwrap_or_else(|e| e.into_inner());
                map.values()
                    .map(|r| *r.due.lock().unwrap_or_else(|e| e.into_inner()))
                    .min()
            };
            match next_due {
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at.into()) => {}
                        () = self.wake.notified() => {}
                    }
                }
                None => self.wake.notified().await,
            }
        }
    }
}

type FetchClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Empty<bytes::Bytes>,
>;

/// An HTTP/1.1 client for `http://` and `https://` JWKS URIs; servers
/// are verified against the Mozilla roots built in (`webpki-roots`), so
/// the proxy needs no system certificate store.
fn fetch_client() -> FetchClient {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build();
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https)
}

async fn fetch(client: &FetchClient, uri: &str) -> Result<Vec<Key>, String> {
    use http_body_util::BodyExt;
    let uri: http::Uri = uri.parse().map_err(|e| format!("bad URI: {e}"))?;
    let get = async {
        let resp = client
            .get(uri)
            .await
            .map_err(|e| match std::error::Error::source(&e) {
                Some(s) => format!("{e}: {s}"),
                None => e.to_string(),
            })?;
        if !resp.status().is_success() {
            return Err(format!("HTTP status {}", resp.status()));
        }
        let body = http_body_util::Limited::new(resp.into_body(), JWKS_MAX_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the body: {e}"))?
            .to_bytes();
        let text = std::str::from_utf8(&body).map_err(|_| "the body is not UTF-8".to_string())?;
        parse_jwks(text)
    };
    tokio::time::timeout(JWKS_TIMEOUT, get)
        .await
        .map_err(|_| format!("no answer within {JWKS_TIMEOUT:?}"))?
}

/// The `www-authenticate` value of a `401` for a request to `host` and
/// `target`, as Envoy writes it.
pub fn challenge(host: &str, target: &str) -> String {
    let path = target.split(['?', '#']).next().unwrap_or_default();
    let realm: String = format!("http://{host}{path}")
        .chars()
        .filter(|c| *c != '"' && *c != '\\' && !c.is_control())
        .collect();
    format!("Bearer realm=\"{realm}\", error=\"invalid_token\"")
}

#[cfg(test)]
mod tests;
