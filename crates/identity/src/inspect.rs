//! Certificate inspection for `meshward cert inspect`: the facts an
//! operator checks (SPIFFE ID, names, serial, key, validity, time left) and
//! the result of verifying the chain against a root.

use std::path::Path;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, UnixTime};
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer as _;

use crate::bundle::TrustBundle;
use crate::duration::format_duration;
use crate::keys::PublicKeyKind;
use crate::pem::{self, PemError};
use crate::verify::{Side, SvidVerifier, TrustDomains, identity_of_parsed};

/// Why a file cannot be inspected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InspectError {
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error("{}: certificate #{index} is not valid X.509: {reason}", path.display())]
    BadCertificate {
        path: std::path::PathBuf,
        index: usize,
        reason: String,
    },
}

/// One certificate's facts.
#[derive(Debug, Clone, Serialize)]
pub struct CertReport {
    pub spiffe_id: Option<String>,
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub key_type: String,
    pub is_ca: bool,
    pub not_before: String,
    pub not_after: String,
    /// Seconds until expiry (negative once expired).
    pub seconds_left: i64,
    /// Human form of `seconds_left`, or `expired`.
    pub time_left: String,
}

/// The outcome of chain verification.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Verification {
    /// No root was given.
    NotChecked,
    /// The chain verifies to a trusted root.
    Valid { identity: Option<String> },
    /// The chain does not verify.
    Invalid { error: String },
}

/// The report for a PEM file: every certificate, first one first.
#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    pub certificates: Vec<CertReport>,
    pub verification: Verification,
}

/// Inspects every certificate of a PEM file; verifies the chain (first
/// certificate, the rest as intermediates) against `roots` if given.
pub fn inspect_file(
    path: &Path,
    roots: Option<&TrustBundle>,
) -> Result<InspectReport, InspectError> {
    let certs = pem::read_certs(path)?;
    inspect_certs(&certs, path, roots, OffsetDateTime::now_utc())
}

/// As [`inspect_file`] on decoded certificates at `now`.
pub fn inspect_certs(
    certs: &[CertificateDer<'static>],
    origin: &Path,
    roots: Option<&TrustBundle>,
    now: OffsetDateTime,
) -> Result<InspectReport, InspectError> {
    let mut parsed = Vec::with_capacity(certs.len());
    for (index, der) in certs.iter().enumerate() {
        let cert = X509Certificate::from_der(der)
            .map_err(|e| InspectError::BadCertificate {
                path: origin.to_owned(),
                index,
                reason: e.to_string(),
            })?
            .1;
        parsed.push(cert);
    }
    let certificates = parsed.iter().map(|c| report(c, now)).collect();
    let verification = match (roots, certs.split_first()) {
        (Some(roots), Some((leaf, rest))) => verify(leaf, rest, &parsed, roots, now),
        _ => Verification::NotChecked,
    };
    Ok(InspectReport {
        certificates,
        verification,
    })
}

fn report(c: &X509Certificate<'_>, now: OffsetDateTime) -> CertReport {
    let fmt = |t: OffsetDateTime| t.format(&Rfc3339).unwrap_or_else(|_| t.to_string());
    let not_before = c.validity().not_before.to_datetime();
    let not_after = c.validity().not_after.to_datetime();
    let seconds_left = (not_after - now).whole_seconds();
    let is_ca = c
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    let spiffe_id = if is_ca {
        // CA certificates carry the trust domain's ID (spiffe://TD), not a workload's.
        c.subject_alternative_name().ok().flatten().and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => {
                    Some((*u).to_owned())
                }
                _ => None,
            })
        })
    } else {
        identity_of_parsed(c).ok().map(|id| id.to_string())
    };
    CertReport {
        spiffe_id,
        subject: c.subject().to_string(),
        issuer: c.issuer().to_string(),
        serial: crate::issue::hex(c.raw_serial()),
        key_type: PublicKeyKind::of(c.public_key()).to_string(),
        is_ca,
        not_before: fmt(not_before),
        not_after: fmt(not_after),
        seconds_left,
        time_left: if seconds_left <= 0 {
            "expired".into()
        } else {
            format_duration(Duration::from_secs(seconds_left.unsigned_abs()))
        },
    }
}

fn verify(
    leaf: &CertificateDer<'_>,
    rest: &[CertificateDer<'_>],
    parsed: &[X509Certificate<'_>],
    roots: &TrustBundle,
    now: OffsetDateTime,
) -> Verification {
    let leaf_is_ca = parsed
        .first()
        .and_then(|c| c.basic_constraints().ok().flatten())
        .is_some_and(|bc| bc.value.ca);
    if leaf_is_ca {
        return verify_ca_chain(parsed, roots, now);
    }
    let verifier = SvidVerifier::new(roots.clone(), TrustDomains::any());
    let unix = UnixTime::since_unix_epoch(Duration::from_secs(
        u64::try_from(now.unix_timestamp()).unwrap_or_default(),
    ));
    match verifier.verify(leaf, rest, unix, Side::Server) {
        Ok(id) => Verification::Valid {
            identity: Some(id.to_string()),
        },
        Err(e) => Verification::Invalid {
            error: e.to_string(),
        },
    }
}

/// A CA certificate (e.g. `ca-cert.pem` or `cert-chain.pem`): each
/// certificate must be signed by the next, and the last by a trusted root.
fn verify_ca_chain(
    parsed: &[X509Certificate<'_>],
    roots: &TrustBundle,
    now: OffsetDateTime,
) -> Verification {
    let invalid = |error: String| Verification::Invalid { error };
    for (i, c) in parsed.iter().enumerate() {
        let v = c.validity();
        if now < v.not_before.to_datetime() || now > v.not_after.to_datetime() {
            return invalid(format!("certificate #{i} is outside its validity period"));
        }
    }
    for (i, pair) in parsed.windows(2).enumerate() {
        let [child, parent] = pair else { continue };
        if child.verify_signature(Some(parent.public_key())).is_err() {
            return invalid(format!(
                "certificate #{i} is not signed by certificate #{}",
                i + 1
            ));
        }
    }
    let Some(last) = parsed.last() else {
        return invalid("no certificate".into());
    };
    for root in roots.roots() {
        let Ok((_, r)) = X509Certificate::from_der(root) else {
            continue;
        };
        if r.subject().as_raw() == last.issuer().as_raw()
            && last.verify_signature(Some(r.public_key())).is_ok()
        {
            return Verification::Valid { identity: None };
        }
    }
    invalid("certificate does not chain to a trusted root".into())
}
