//! The bootstrap token: a JWT the control plane minted for one namespace
//! and service account (`meshward control token`). The proxy does not
//! verify it (the CA does); it reads the payload's `spiffe` claim to know
//! which identity to put in its CSR, and sends the token as
//! `authorization: Bearer <token>` with a first certificate request.
//! Nothing here logs the token.

use std::path::Path;

use base64::Engine as _;
use meshward_identity::SpiffeId;

/// Why the bootstrap token cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error("cannot read the bootstrap token {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("the bootstrap token {path} is empty")]
    Empty { path: String },
    #[error("the bootstrap token {path} is not a JWT: {reason}")]
    NotJwt { path: String, reason: String },
    #[error("the bootstrap token {path} has no \"spiffe\" claim naming the identity it grants")]
    NoIdentity { path: String },
    #[error(
        "the bootstrap token {path} grants {id:?}, which is not a workload identity (spiffe://TD/ns/NS/sa/SA): {reason}"
    )]
    BadIdentity {
        path: String,
        id: String,
        reason: String,
    },
}

/// A bootstrap token read from its file.
#[derive(Clone)]
pub(crate) struct Token {
    /// The token as sent (trimmed).
    pub(crate) raw: String,
    /// The identity its `spiffe` claim grants.
    pub(crate) id: SpiffeId,
}

// Never print the token itself.
impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Reads and decodes the token in `path` (trimmed of surrounding
/// whitespace, as Kubernetes' projected tokens and `echo >` files have).
pub(crate) fn read(path: &Path) -> Result<Token, TokenError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| TokenError::Read {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    decode(text.trim(), &shown)
}

/// Decodes a JWT's payload (no signature check) and its `spiffe` claim.
pub(crate) fn decode(raw: &str, path: &str) -> Result<Token, TokenError> {
    if raw.is_empty() {
        return Err(TokenError::Empty {
            path: path.to_owned(),
        });
    }
    let not_jwt = |reason: &str| TokenError::NotJwt {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let mut parts = raw.split('.');
    let (Some(_header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(not_jwt("expected three dot-separated parts"));
    };
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| not_jwt("the payload is not base64url"))?;
    let claims: serde_json::Value =
        serde_json::from_slice(&payload).map_err(|_| not_jwt("the payload is not JSON"))?;
    let Some(id) = claims.get("spiffe").and_then(|v| v.as_str()) else {
        return Err(TokenError::NoIdentity {
            path: path.to_owned(),
        });
    };
    let id = SpiffeId::parse_workload(id).map_err(|e| TokenError::BadIdentity {
        path: path.to_owned(),
        id: id.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(Token {
        raw: raw.to_owned(),
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &str) -> String {
        let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.{}", b(r#"{"alg":"ES256"}"#), b(payload), b("sig"))
    }

    #[test]
    fn the_spiffe_claim_names_the_identity() {
        let t = decode(
            &jwt(r#"{"spiffe":"spiffe://cluster.local/ns/prod/sa/api","sub":"system:serviceaccount:prod:api"}"#),
            "t",
        )
        .unwrap();
        assert_eq!(t.id.as_str(), "spiffe://cluster.local/ns/prod/sa/api");
        assert!(!format!("{t:?}").contains(&t.raw));
    }

    #[test]
    fn bad_tokens_say_what_is_wrong() {
        assert!(matches!(decode("", "t"), Err(TokenError::Empty { .. })));
        assert!(matches!(decode("a.b", "t"), Err(TokenError::NotJwt { .. })));
        assert!(matches!(
            decode("a.!!.c", "t"),
            Err(TokenError::NotJwt { .. })
        ));
        assert!(matches!(
            decode(&jwt(r#"{"sub":"x"}"#), "t"),
            Err(TokenError::NoIdentity { .. })
        ));
        let e = decode(&jwt(r#"{"spiffe":"spiffe://cluster.local/x"}"#), "t").unwrap_err();
        assert!(matches!(e, TokenError::BadIdentity { .. }), "{e}");
    }
}
