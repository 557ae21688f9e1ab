//! Key types: generation of CA and workload keys, and classification of the
//! public keys found in certificates and CSRs.

use std::fmt;
use std::str::FromStr;

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_RSA_SHA256, RsaKeySize};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
};
use x509_parser::x509::SubjectPublicKeyInfo;

/// The key types meshward generates and accepts for CAs and workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KeyType {
    /// ECDSA on P-256 with SHA-256 (the default for workloads).
    #[default]
    EcP256,
    /// ECDSA on P-384 with SHA-384.
    EcP384,
    /// RSA 2048 bits, PKCS#1 v1.5 signatures with SHA-256.
    Rsa2048,
    /// RSA 3072 bits.
    Rsa3072,
    /// RSA 4096 bits.
    Rsa4096,
}

/// A key type name that is not one of `ec-p256`, `ec-p384`, `rsa-2048`, `rsa-3072`, `rsa-4096`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown key type {0:?}: expected one of ec-p256, ec-p384, rsa-2048, rsa-3072, rsa-4096")]
pub struct UnknownKeyType(pub String);

/// Key generation failed in the crypto library.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot generate a {key_type} key: {reason}")]
pub struct KeyGenError {
    pub key_type: KeyType,
    pub reason: String,
}

impl KeyType {
    /// All supported key types, in the order shown in help texts.
    pub const ALL: [KeyType; 5] = [
        KeyType::EcP256,
        KeyType::EcP384,
        KeyType::Rsa2048,
        KeyType::Rsa3072,
        KeyType::Rsa4096,
    ];

    /// The CLI name, e.g. `ec-p256`.
    pub fn name(self) -> &'static str {
        match self {
            KeyType::EcP256 => "ec-p256",
            KeyType::EcP384 => "ec-p384",
            KeyType::Rsa2048 => "rsa-2048",
            KeyType::Rsa3072 => "rsa-3072",
            KeyType::Rsa4096 => "rsa-4096",
        }
    }

    /// Whether this is an RSA key type.
    pub fn is_rsa(self) -> bool {
        matches!(self, KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096)
    }

    /// Generates a fresh key pair of this type.
    pub fn generate(self) -> Result<KeyPair, KeyGenError> {
        let result = match self {
            KeyType::EcP256 => KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256),
            KeyType::EcP384 => KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384),
            KeyType::Rsa2048 => KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_2048),
            KeyType::Rsa3072 => KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_3072),
            KeyType::Rsa4096 => KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_4096),
        };
        result.map_err(|e| KeyGenError {
            key_type: self,
            reason: e.to_string(),
        })
    }

    /// The rcgen signature algorithm a key of this type signs with, and
    /// whose SubjectPublicKeyInfo encoding it has.
    pub(crate) fn signature_algorithm(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            KeyType::EcP256 => &PKCS_ECDSA_P256_SHA256,
            KeyType::EcP384 => &PKCS_ECDSA_P384_SHA384,
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => &PKCS_RSA_SHA256,
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KeyType {
    type Err = UnknownKeyType;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyType::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownKeyType(s.to_owned()))
    }
}

/// The public key of a certificate or CSR, classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublicKeyKind {
    /// ECDSA P-256.
    EcP256,
    /// ECDSA P-384.
    EcP384,
    /// Another elliptic curve (not accepted by meshward).
    EcOther,
    /// RSA with this modulus size in bits.
    Rsa { bits: usize },
    /// Any other algorithm (not accepted by meshward).
    Other,
}

impl PublicKeyKind {
    /// Classifies a SubjectPublicKeyInfo.
    pub fn of(spki: &SubjectPublicKeyInfo<'_>) -> Self {
        let alg = &spki.algorithm.algorithm;
        if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            match curve {
                Some(c) if c == OID_EC_P256 => PublicKeyKind::EcP256,
                Some(c) if c == OID_NIST_EC_P384 => PublicKeyKind::EcP384,
                _ => PublicKeyKind::EcOther,
            }
        } else if *alg == OID_PKCS1_RSAENCRYPTION {
            match spki.parsed() {
                Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => PublicKeyKind::Rsa {
                    bits: bit_len(rsa.modulus),
                },
                _ => PublicKeyKind::Other,
            }
        } else {
            PublicKeyKind::Other
        }
    }

    /// The meshward key type, for the accepted kinds (RSA 2048..=4096 bits is
    /// accepted at any size in that range and reported as the nearest type below).
    pub fn key_type(self) -> Option<KeyType> {
        match self {
            PublicKeyKind::EcP256 => Some(KeyType::EcP256),
            PublicKeyKind::EcP384 => Some(KeyType::EcP384),
            PublicKeyKind::Rsa { bits } if (2048..3072).contains(&bits) => Some(KeyType::Rsa2048),
            PublicKeyKind::Rsa { bits } if (3072..4096).contains(&bits) => Some(KeyType::Rsa3072),
            PublicKeyKind::Rsa { bits: 4096 } => Some(KeyType::Rsa4096),
            _ => None,
        }
    }
}

impl fmt::Display for PublicKeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublicKeyKind::EcP256 => f.write_str("ECDSA P-256"),
            PublicKeyKind::EcP384 => f.write_str("ECDSA P-384"),
            PublicKeyKind::EcOther => f.write_str("ECDSA (unsupported curve)"),
            PublicKeyKind::Rsa { bits } => write!(f, "RSA {bits}"),
            PublicKeyKind::Other => f.write_str("unsupported algorithm"),
        }
    }
}

fn bit_len(be: &[u8]) -> usize {
    let trimmed: &[u8] = match be.iter().position(|b| *b != 0) {
        Some(i) => be.get(i..).unwrap_or_default(),
        None => return 0,
    };
    match trimmed.first() {
        Some(first) => trimmed.len() * 8 - first.leading_zeros() as usize,
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for k in KeyType::ALL {
            assert_eq!(k.name().parse::<KeyType>().unwrap(), k);
        }
        assert!("dsa".parse::<KeyType>().is_err());
    }

    #[test]
    fn bit_length() {
        assert_eq!(bit_len(&[0, 0x80, 0]), 16);
        assert_eq!(bit_len(&[0x01, 0]), 9);
        assert_eq!(bit_len(&[]), 0);
        assert_eq!(bit_len(&[0, 0]), 0);
    }
}
