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
mod tests {
    use super::*;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    use jsonwebtoken::jwk::Jwk;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const ISS: &str = "https://issuer.example.com";

    /// An ES256 signing key and its JWK (with `kid`).
    fn es256(kid: &str) -> (EncodingKey, Value) {
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .unwrap();
        let key = EncodingKey::from_ec_der(pkcs8.as_ref());
        let mut jwk =
            serde_json::to_value(Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap()).unwrap();
        jwk["kid"] = json!(kid);
        (key, jwk)
    }

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
        let admin =
            URL_SAFE_NO_PAD.encode(claims(json!({"sub": "admin", "aud": "shop"})).to_string());
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
        let key =
            rustls_pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
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
}
