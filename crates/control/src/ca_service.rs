//! Istio's `istio.v1.auth.IstioCertificateService/CreateCertificate`.
//!
//! The caller proves an identity, by its current mesh certificate (mTLS,
//! a renewal) or by a bootstrap token in the `authorization: Bearer`
//! metadata (a first issuance). The CSR must ask for exactly that identity
//! and nothing else: any other SPIFFE ID, another trust domain, several URI
//! SANs, no URI SAN, DNS/IP/email SANs or a CA is refused with
//! PERMISSION_DENIED and a message saying why. Then the CA signs the proven
//! identity (it never copies what the CSR asks for). CSR size and the
//! request rate per caller are bounded; bad input never panics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshward_identity::issue::{CheckedCsr, IssueError, check_csr};
use meshward_identity::{CertificateAuthority, SpiffeId, pem};
use meshward_proto::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use meshward_proto::ca::{IstioCertificateRequest, IstioCertificateResponse, Roots};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject as _;
use tonic::{Request, Response, Status};

use crate::authority::Authority;
use crate::metrics::{Metrics, RefusalLabels};
use crate::peer::PeerInfo;
use crate::token;

/// CSRs longer than this (PEM bytes) are refused unparsed.
pub const MAX_CSR_LEN: usize = 16 * 1024;

/// gRPC messages longer than this are refused by the codec.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;

/// Per-caller token bucket: `burst` requests at once, refilled at
/// `per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Bucket size.
    pub burst: u32,
    /// Refill rate (requests per second).
    pub per_second: f64,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            burst: 20,
            per_second: 10.0,
        }
    }
}

/// Lifetimes the service grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// When the request asks for none (`validity_duration` 0).
    pub default_ttl: Duration,
    /// Requests are capped to this.
    pub max_ttl: Duration,
}

/// How the caller proved its identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proof {
    /// Its current mesh certificate (renewal).
    Certificate,
    /// A bootstrap token (first issuance).
    Token,
}

impl Proof {
    fn as_str(self) -> &'static str {
        match self {
            Proof::Certificate => "renewal",
            Proof::Token => "token",
        }
    }
}

/// The CA service (build the tonic service with [`CaService::into_server`]).
#[derive(Debug, Clone)]
pub struct CaService {
    authority: Authority,
    metrics: Arc<Metrics>,
    lifetimes: Lifetimes,
    limiter: Arc<RateLimiter>,
}

impl CaService {
    /// A service signing with `authority`'s current CA.
    pub fn new(
        authority: Authority,
        metrics: Arc<Metrics>,
        lifetimes: Lifetimes,
        rate_limit: RateLimit,
    ) -> Self {
        Self {
            authority,
            metrics,
            lifetimes,
            limiter: Arc::new(RateLimiter::new(rate_limit)),
        }
    }

    /// The tonic service, with the message size bounded.
    pub fn into_server(self) -> IstioCertificateServiceServer<CaService> {
        IstioCertificateServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_LEN)
            .max_encoding_message_size(MAX_MESSAGE_LEN)
    }

    fn refuse(&self, reason: &str, status: Status) -> Status {
        self.metrics
            .ca_refused
            .get_or_create(&RefusalLabels {
                reason: reason.to_owned(),
            })
            .inc();
        status
    }

    fn authenticate(
        &self,
        request: &Request<IstioCertificateRequest>,
        ca: &CertificateAuthority,
    ) -> Result<(SpiffeId, Proof), Status> {
        if let Some(id) = PeerInfo::of(request).and_then(|p| p.identity.clone()) {
            return Ok((id, Proof::Certificate));
        }
        let unauthenticated = |msg: String| {
            self.metrics.authentication_failure_count.inc();
            self.refuse("unauthenticated", Status::unauthenticated(msg))
        };
        let Some(value) = request.metadata().get("authorization") else {
            return Err(unauthenticated(
                "no identity proven: present a mesh certificate (renewal) or an \"authorization: Bearer TOKEN\" bootstrap token (first certificate)".into(),
            ));
        };
        let value = value
            .to_str()
            .map_err(|_| unauthenticated("authorization metadata is not ASCII".into()))?;
        let Some(jwt) = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
        else {
            return Err(unauthenticated(
                "authorization metadata is not \"Bearer TOKEN\"".into(),
            ));
        };
        match token::verify(ca, jwt.trim()) {
            Ok(id) => Ok((id, Proof::Token)),
            Err(e) => Err(unauthenticated(format!("bootstrap token refused: {e}"))),
        }
    }

    /// The CSR must parse, carry a valid signature and request exactly
    /// `id` and nothing else; returns it, checked, for signing.
    fn check_csr<'a>(&self, der: &'a [u8], id: &SpiffeId) -> Result<CheckedCsr<'a>, Status> {
        let checked = check_csr(der).map_err(|e| {
            self.metrics.csr_parsing_err_count.inc();
            self.refuse(
                "invalid_argument",
                Status::invalid_argument(format!("CSR refused: {e}")),
            )
        })?;
        let request = &checked.request;
        let denied = |msg: String| self.refuse("permission_denied", Status::permission_denied(msg));
        if request.ca {
            return Err(denied(format!(
                "the CSR requests a CA certificate (basicConstraints CA:TRUE or keyCertSign); the caller proved {id}, a workload, and workload certificates are never CAs"
            )));
        }
        if !request.other_names.is_empty() {
            return Err(denied(format!(
                "the CSR requests {} besides the SPIFFE ID; a workload certificate carries only {id}",
                request.other_names.join(", ")
            )));
        }
        let verdict = match request.uris.as_slice() {
            [] => Err(denied(format!(
                "the CSR requests no SPIFFE ID (no URI SAN); it must request exactly {id}, the identity the caller proved"
            ))),
            [uri] => {
                let requested = SpiffeId::parse(uri).map_err(|e| {
                    denied(format!(
                        "the CSR requests URI SAN {uri:?}, which is not a SPIFFE ID ({e}); the caller proved {id}"
                    ))
                })?;
                let td = self.authority.trust_domain();
                if requested.trust_domain_str() != td.as_str() {
                    return Err(denied(format!(
                        "the CSR requests {requested} in trust domain {:?} but this CA signs for {:?} only; the caller proved {id}",
                        requested.trust_domain_str(),
                        td.as_str()
                    )));
                }
                if requested != *id {
                    return Err(denied(format!(
                        "the CSR requests {requested} but the caller proved {id}"
                    )));
                }
                Ok(())
            }
            many => Err(denied(format!(
                "the CSR requests {} URI SANs ({}); a workload certificate has exactly one, {id}",
                many.len(),
                many.join(", ")
            ))),
        };
        verdict.map(|()| checked)
    }

    fn ttl(&self, validity_duration: i64) -> Result<Duration, Status> {
        match u64::try_from(validity_duration) {
            Ok(0) => Ok(self.lifetimes.default_ttl),
            Ok(secs) => Ok(Duration::from_secs(secs).min(self.lifetimes.max_ttl)),
            Err(_) => Err(self.refuse(
                "invalid_argument",
                Status::invalid_argument(format!(
                    "validity_duration {validity_duration} is negative"
                )),
            )),
        }
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        self.metrics.csr_count.inc();
        let signing = self.authority.current();
        let remote = PeerInfo::of(&request).and_then(|p| p.remote);
        let (id, proof) = self.authenticate(&request, &signing.ca)?;
        if !self.limiter.allow(&id) {
            return Err(self.refuse(
                "rate_limited",
                Status::resource_exhausted(format!(
                    "too many certificate requests for {id}: slow down"
                )),
            ));
        }
        let body = request.into_inner();
        if body.csr.len() > MAX_CSR_LEN {
            return Err(self.refuse(
                "invalid_argument",
                Status::invalid_argument(format!(
                    "CSR is {} bytes, more than the {MAX_CSR_LEN} accepted",
                    body.csr.len()
                )),
            ));
        }
        let ttl = self.ttl(body.validity_duration)?;
        let der =
            CertificateSigningRequestDer::from_pem_slice(body.csr.as_bytes()).map_err(|e| {
                self.metrics.csr_parsing_err_count.inc();
                self.refuse(
                    "invalid_argument",
                    Status::invalid_argument(format!(
                        "csr is not a PEM \"CERTIFICATE REQUEST\": {e}"
                    )),
                )
            })?;
        let checked = self.check_csr(&der, &id)?;
        let issued = signing
            .ca
            .sign_checked(&checked, &id, Some(ttl))
            .map_err(|e| match e {
                IssueError::MalformedCsr { .. }
                | IssueError::BadCsrSignature
                | IssueError::UnsupportedKey { .. } => self.refuse(
                    "invalid_argument",
                    Status::invalid_argument(format!("CSR refused: {e}")),
                ),
                IssueError::CaExpired { .. } | IssueError::Sign { .. } => {
                    tracing::error!(src.identity = %id, error = %e, "cannot sign");
                    Status::unavailable(format!("the CA cannot sign now: {e}"))
                }
                other => self.refuse(
                    "permission_denied",
                    Status::permission_denied(other.to_string()),
                ),
            })?;
        self.metrics.success_cert_issuance_count.inc();
        tracing::info!(
            src.identity = %id,
            src.addr = ?remote,
            serial = issued.serial(),
            not_after = %issued.not_after(),
            proof = proof.as_str(),
            "certificate issued"
        );
        // Leaf then intermediates; the roots travel in `root_cert`.
        let cert_chain = issued
            .chain()
            .iter()
            .filter(|c| !signing.bundle.roots().contains(c))
            .map(|c| pem::encode("CERTIFICATE", c))
            .collect();
        let ca_cert = signing
            .bundle
            .roots()
            .iter()
            .map(|c| pem::encode("CERTIFICATE", c))
            .collect();
        Ok(Response::new(IstioCertificateResponse {
            cert_chain,
            root_cert: Some(Roots { ca_cert }),
        }))
    }
}

/// Token buckets by proven identity.
#[derive(Debug)]
struct RateLimiter {
    limit: RateLimit,
    buckets: Mutex<HashMap<SpiffeId, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Beyond this many tracked callers, full buckets are forgotten.
const MAX_TRACKED_CALLERS: usize = 100_000;

impl RateLimiter {
    fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn allow(&self, id: &SpiffeId) -> bool {
        let now = Instant::now();
        let burst = f64::from(self.limit.burst);
        let rate = self.limit.per_second;
        // A panic while holding the lock leaves consistent plain data.
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_TRACKED_CALLERS {
            buckets
                .retain(|_, b| b.tokens + now.duration_since(b.last).as_secs_f64() * rate < burst);
        }
        let bucket = buckets.entry(id.clone()).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        bucket.tokens =
            (bucket.tokens + now.duration_since(bucket.last).as_secs_f64() * rate).min(burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_the_burst_then_refuses() {
        let limiter = RateLimiter::new(RateLimit {
            burst: 3,
            per_second: 0.001,
        });
        let a = SpiffeId::parse("spiffe://td/ns/a/sa/a").unwrap();
        let b = SpiffeId::parse("spiffe://td/ns/b/sa/b").unwrap();
        assert!((0..3).all(|_| limiter.allow(&a)));
        assert!(!limiter.allow(&a));
        assert!(limiter.allow(&b), "buckets are per caller");
    }
}
