//! Bootstrap tokens: how a workload proves its identity for its first
//! certificate, before it has one.
//!
//! A token is a JWT signed with the signing CA's own key (ES256 for P-256,
//! ES384 for P-384, RS256 for RSA), so every replica over the same plug-in
//! CA accepts the others' tokens, and verified against the public key of
//! the signing CA certificate in force. It is bound to one namespace and
//! service account (`sub` and `spiffe` must agree), to the CA's audience
//! (`istio-ca`, Istio's default), and is short-lived (1 h by default, 24 h at
//! most). Tokens are never logged; `sub` and `jti` at most.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SecureRandom as _;
use aws_lc_rs::signature::{self, EcdsaKeyPair, RsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use meshward_identity::{CertificateAuthority, KeyType, SpiffeId};
use rustls_pki_types::PrivateKeyDer;
use serde::{Deserialize, Serialize};
use x509_parser::prelude::FromDer as _;

/// `iss` of every token.
pub const ISSUER: &str = "meshward-control";
/// `aud` of every token: Istio's default CA audience.
pub const AUDIENCE: &str = "istio-ca";
/// Token lifetime when none is asked for.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// The longest token lifetime.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Tokens longer than this are refused unread.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY: Duration = Duration::from_secs(60);

/// The claims of a bootstrap token (the proxy relies on these names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// [`ISSUER`].
    pub iss: String,
    /// [`AUDIENCE`].
    pub aud: String,
    /// `system:serviceaccount:NS:SA`, as Kubernetes service-account tokens.
    pub sub: String,
    /// `spiffe://TD/ns/NS/sa/SA`: the identity the token proves.
    pub spiffe: String,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Not before (Unix seconds).
    pub nbf: u64,
    /// Expiry (Unix seconds).
    pub exp: u64,
    /// A unique token ID (random, hex).
    pub jti: String,
}

/// Why a token could not be minted or was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Namespace or service account do not form a SPIFFE ID.
    #[error("namespace {namespace:?} / service account {service_account:?}: {reason}")]
    BadIdentity {
        /// Namespace.
        namespace: String,
        /// Service account.
        service_account: String,
        /// Why.
        reason: String,
    },
    /// TTL zero or above [`MAX_TOKEN_TTL`].
    #[error("token lifetime must be between 1s and 24h")]
    BadTtl,
    /// The CA key cannot sign (it loaded, so this is a crypto library error).
    #[error("cannot sign the token with the CA key: {reason}")]
    Sign {
        /// Why.
        reason: String,
    },
    /// The token is longer than [`MAX_TOKEN_LEN`].
    #[error("token is {len} bytes, more than the {MAX_TOKEN_LEN} accepted")]
    TooLong {
        /// Its length.
        len: usize,
    },
    /// The token is expired (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// The token is not valid yet (beyond the leeway).
    #[error("token is not valid yet (nbf in the future)")]
    NotYetValid,
    /// Signature does not verify with the current signing CA's key (a
    /// forged token, or one signed by another CA).
    #[error("token signature does not verify with this CA's key")]
    BadSignature,
    /// `aud` is not [`AUDIENCE`].
    #[error("token audience is not {AUDIENCE:?}")]
    WrongAudience,
    /// `iss` is not [`ISSUER`].
    #[error("token issuer is not {ISSUER:?}")]
    WrongIssuer,
    /// Malformed JWT, wrong algorithm, missing claims.
    #[error("malformed token: {reason}")]
    Malformed {
        /// Why.
        reason: String,
    },
    /// `spiffe` is not a workload SPIFFE ID, or `sub` names another account.
    #[error("token subject {sub:?} and identity {spiffe:?} disagree")]
    SubjectMismatch {
        /// `sub`.
        sub: String,
        /// `spiffe`.
        spiffe: String,
    },
    /// The identity is in another trust domain than the CA's.
    #[error("token identity {spiffe} is not in trust domain {trust_domain:?}")]
    ForeignTrustDomain {
        /// `spiffe`.
        spiffe: String,
        /// The CA's trust domain.
        trust_domain: String,
    },
}

/// Mints a token for `namespace`/`service_account` in `ca`'s trust domain.
/// `ttl` defaults to [`DEFAULT_TOKEN_TTL`] and may not exceed
/// [`MAX_TOKEN_TTL`].
pub fn mint(
    ca: &CertificateAuthority,
    namespace: &str,
    service_account: &str,
    ttl: Option<Duration>,
) -> Result<String, TokenError> {
    let ttl = ttl.unwrap_or(DEFAULT_TOKEN_TTL);
    if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
        return Err(TokenError::BadTtl);
    }
    let id = SpiffeId::workload(ca.trust_domain(), namespace, service_account).map_err(|e| {
        TokenError::BadIdentity {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            reason: e.to_string(),
        }
    })?;
    let now = unix_now();
    let claims = Claims {
        iss: ISSUER.to_owned(),
        aud: AUDIENCE.to_owned(),
        sub: subject(namespace, service_account),
        spiffe: id.to_string(),
        iat: now,
        nbf: now,
        exp: now + ttl.as_secs(),
        jti: random_hex(16)?,
    };
    encode(ca, &claims)
}

/// Signs arbitrary claims with the CA key (tests craft bad tokens with it).
pub fn encode<T: Serialize>(ca: &CertificateAuthority, claims: &T) -> Result<String, TokenError> {
    let sign_err = |reason: String| TokenError::Sign { reason };
    let alg = algorithm(ca.key_type());
    let header = serde_json::json!({ "alg": alg_name(alg), "typ": "JWT" });
    let header = serde_json::to_vec(&header).map_err(|e| sign_err(e.to_string()))?;
    let payload = serde_json::to_vec(claims).map_err(|e| sign_err(e.to_string()))?;
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let signature = sign(ca, alg, signing_input.as_bytes())?;
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature)
    ))
}

/// Verifies `token` against the current signing CA and returns the
/// identity it proves.
pub fn verify(ca: &CertificateAuthority, token: &str) -> Result<SpiffeId, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLong { len: token.len() });
    }
    let alg = algorithm(ca.key_type());
    let key = decoding_key(ca)?;
    let mut validation = Validation::new(alg);
    validation.leeway = LEEWAY.as_secs();
    validation.validate_nbf = true;
    validation.set_audience(&[AUDIENCE]);
    validation.set_issuer(&[ISSUER]);
    validation.set_required_spec_claims(&["exp", "nbf", "iat", "aud", "iss", "sub"]);
    let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|e| {
        use jsonwebtoken::errors::ErrorKind as K;
        match e.kind() {
            K::ExpiredSignature => TokenError::Expired,
            K::ImmatureSignature => TokenError::NotYetValid,
            K::InvalidSignature => TokenError::BadSignature,
            K::InvalidAudience => TokenError::WrongAudience,
            K::InvalidIssuer => TokenError::WrongIssuer,
            _ => TokenError::Malformed {
                reason: e.to_string(),
            },
        }
    })?;
    let claims = data.claims;
    let mismatch = || TokenError::SubjectMismatch {
        sub: claims.sub.clone(),
        spiffe: claims.spiffe.clone(),
    };
    let id = SpiffeId::parse_workload(&claims.spiffe).map_err(|_| mismatch())?;
    if id.trust_domain_str() != ca.trust_domain().as_str() {
        return Err(TokenError::ForeignTrustDomain {
            spiffe: claims.spiffe.clone(),
            trust_domain: ca.trust_domain().to_string(),
        });
    }
    let (Some(ns), Some(sa)) = (id.namespace(), id.service_account()) else {
        return Err(mismatch());
    };
    if claims.sub != subject(ns, sa) {
        return Err(mismatch());
    }
    Ok(id)
}

/// `system:serviceaccount:NS:SA`.
pub fn subject(namespace: &str, service_account: &str) -> String {
    format!("system:serviceaccount:{namespace}:{service_account}")
}

fn algorithm(key_type: KeyType) -> Algorithm {
    match key_type {
        KeyType::EcP256 => Algorithm::ES256,
        KeyType::EcP384 => Algorithm::ES384,
        KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => Algorithm::RS256,
    }
}

fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        _ => "RS256",
    }
}

fn sign(ca: &CertificateAuthority, alg: Algorithm, message: &[u8]) -> Result<Vec<u8>, TokenError> {
    let sign_err = |reason: String| TokenError::Sign { reason };
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let der = ca.signing_key_der();
    match alg {
        Algorithm::ES256 | Algorithm::ES384 => {
            let params = if alg == Algorithm::ES256 {
                &signature::ECDSA_P256_SHA256_FIXED_SIGNING
            } else {
                &signature::ECDSA_P384_SHA384_FIXED_SIGNING
            };
            let key = match der {
                PrivateKeyDer::Pkcs8(k) => EcdsaKeyPair::from_pkcs8(params, k.secret_pkcs8_der()),
                other => EcdsaKeyPair::from_private_key_der(params, other.secret_der()),
            }
            .map_err(|e| sign_err(e.to_string()))?;
            let sig = key
                .sign(&rng, message)
                .map_err(|e| sign_err(e.to_string()))?;
            Ok(sig.as_ref().to_vec())
        }
        _ => {
            let key = match der {
                PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
                other => RsaKeyPair::from_der(other.secret_der()),
            }
            .map_err(|e| sign_err(e.to_string()))?;
            let mut sig = vec![0; key.public_modulus_len()];
            key.sign(&signature::RSA_PKCS1_SHA256, &rng, message, &mut sig)
                .map_err(|e| sign_err(e.to_string()))?;
            Ok(sig)
        }
    }
}

/// The signing certificate's public key: the raw EC point, or the PKCS#1
/// RSAPublicKey, which is what the SPKI's BIT STRING holds.
fn decoding_key(ca: &CertificateAuthority) -> Result<DecodingKey, TokenError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(ca.signing_cert())
        .map_err(|e| TokenError::Sign {
            reason: format!("signing certificate does not parse: {e}"),
        })?;
    let raw = cert.public_key().subject_public_key.data.as_ref();
    Ok(if ca.key_type().is_rsa() {
        DecodingKey::from_rsa_der(raw)
    } else {
        DecodingKey::from_ec_der(raw)
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn random_hex(n: usize) -> Result<String, TokenError> {
    let mut bytes = vec![0u8; n];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|e| TokenError::Sign {
            reason: format!("no randomness: {e}"),
        })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshward_identity::{CaOptions, CaSettings, RootCa, TrustDomain};

    fn ca(key_type: KeyType, td: &str) -> CertificateAuthority {
        let root = RootCa::generate(&CaOptions {
            trust_domain: TrustDomain::new(td).unwrap(),
            organization: td.into(),
            common_name: None,
            key_type,
            lifetime: Duration::from_secs(3600 * 24),
        })
        .unwrap();
        root.into_authority(CaSettings::default()).unwrap()
    }

    #[test]
    fn round_trip_for_every_key_family() {
        for kt in [KeyType::EcP256, KeyType::EcP384, KeyType::Rsa2048] {
            let ca = ca(kt, "cluster.local");
            let token = mint(&ca, "default", "api", None).unwrap();
            let id = verify(&ca, &token).unwrap_or_else(|e| panic!("{kt}: {e}"));
            assert_eq!(id.as_str(), "spiffe://cluster.local/ns/default/sa/api");
        }
    }

    #[test]
    fn claims_have_the_documented_names_and_lifetime() {
        let ca = ca(KeyType::EcP256, "cluster.local");
        let token = mint(&ca, "default", "api", None).unwrap();
        let payload = token.split('.').nth(1).unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert_eq!(json["iss"], "meshward-control");
        assert_eq!(json["aud"], "istio-ca");
        assert_eq!(json["sub"], "system:serviceaccount:default:api");
        assert_eq!(json["spiffe"], "spiffe://cluster.local/ns/default/sa/api");
        assert_eq!(json["jti"].as_str().unwrap().len(), 32);
        let (iat, exp) = (json["iat"].as_u64().unwrap(), json["exp"].as_u64().unwrap());
        assert_eq!(exp - iat, 3600);
        assert_eq!(json["nbf"], json["iat"]);
        let header = token.split('.').next().unwrap();
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
        assert_eq!(header["alg"], "ES256");
    }

    #[test]
    fn refusals() {
        let ca1 = ca(KeyType::EcP256, "cluster.local");
        let ca2 = ca(KeyType::EcP256, "cluster.local");
        let token = mint(&ca1, "default", "api", None).unwrap();
        assert_eq!(verify(&ca2, &token), Err(TokenError::BadSignature));
        assert_eq!(
            verify(&ca1, &"a".repeat(MAX_TOKEN_LEN + 1)),
            Err(TokenError::TooLong {
                len: MAX_TOKEN_LEN + 1
            })
        );
        assert!(matches!(
            verify(&ca1, "garbage"),
            Err(TokenError::Malformed { .. })
        ));
        let now = unix_now();
        let base = Claims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: subject("default", "api"),
            spiffe: "spiffe://cluster.local/ns/default/sa/api".into(),
            iat: now,
            nbf: now,
            exp: now + 600,
            jti: "x".into(),
        };
        let cases: Vec<(Claims, TokenError)> = vec![
            (
                Claims {
                    exp: now - 120,
                    ..base.clone()
                },
                TokenError::Expired,
            ),
            (
                Claims {
                    nbf: now + 300,
                    ..base.clone()
                },
                TokenError::NotYetValid,
            ),
            (
                Claims {
                    aud: "other".into(),
                    ..base.clone()
                },
                TokenError::WrongAudience,
            ),
            (
                Claims {
                    iss: "someone".into(),
                    ..base.clone()
                },
                TokenError::WrongIssuer,
            ),
            (
                Claims {
                    sub: subject("default", "admin"),
                    ..base.clone()
                },
                TokenError::SubjectMismatch {
                    sub: subject("default", "admin"),
                    spiffe: base.spiffe.clone(),
                },
            ),
            (
                Claims {
                    spiffe: "spiffe://other.td/ns/default/sa/api".into(),
                    ..base.clone()
                },
                TokenError::ForeignTrustDomain {
                    spiffe: "spiffe://other.td/ns/default/sa/api".into(),
                    trust_domain: "cluster.local".into(),
                },
            ),
        ];
        for (claims, want) in cases {
            let token = encode(&ca1, &claims).unwrap();
            assert_eq!(verify(&ca1, &token), Err(want));
        }
        // Within the leeway: accepted.
        let token = encode(
            &ca1,
            &Claims {
                exp: now - 10,
                ..base.clone()
            },
        )
        .unwrap();
        assert!(verify(&ca1, &token).is_ok());
        assert_eq!(
            mint(&ca1, "a", "b", Some(MAX_TOKEN_TTL * 2)),
            Err(TokenError::BadTtl)
        );
        assert!(matches!(
            mint(&ca1, "a/b", "c", None),
            Err(TokenError::BadIdentity { .. })
        ));
    }
}
