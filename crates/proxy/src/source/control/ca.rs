//! The CA client over gRPC: Istio's
//! `istio.v1.auth.IstioCertificateService/CreateCertificate`, as
//! istio-agent calls it. A first certificate is asked for without a client
//! certificate and with `authorization: Bearer <token>`; a renewal over
//! mTLS with the current certificate and no token. The response's chain
//! must be for the requested identity and chain to the roots it comes
//! with, which become the trust bundle.

use std::sync::Arc;
use std::time::Duration;

use meshward_identity::rotation::{BoxFuture, CaClient, CaClientError};
use meshward_identity::verify::TrustDomains;
use meshward_identity::{IssueError, Side, SvidVerifier, TrustBundle};
use meshward_proto::ca::IstioCertificateRequest;
use meshward_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use rustls_pki_types::CertificateDer;

use super::connect::{self, Address};
use super::{Shared, Source, SourceState, token};

/// How long one CreateCertificate call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest response accepted (a chain and a bundle of a few roots
/// are a few KiB).
const MAX_RESPONSE: usize = 1 << 20;

/// Signs the proxy's CSRs with the control plane's CA.
#[derive(Debug)]
pub(crate) struct GrpcCa {
    shared: Arc<Shared>,
}

impl GrpcCa {
    pub(crate) fn new(shared: Arc<Shared>) -> GrpcCa {
        GrpcCa { shared }
    }

    async fn sign_pem(
        &self,
        csr_der: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<Vec<CertificateDer<'static>>, (SourceState, String)> {
        let shared = &self.shared;
        let csr = meshward_identity::pem::encode("CERTIFICATE REQUEST", &csr_der);
        // A renewal proves the identity with the current certificate; a
        // first issuance (or one after the certificate expired) with the
        // token, read again each time (it may have been replaced).
        let credentials = shared.valid_credentials();
        let token = match credentials {
            Some(_) => None,
            None => Some(
                token::read(&shared.token_file)
                    .map_err(|e| (SourceState::Refused, e.to_string()))?,
            ),
        };
        let mut unreachable = Vec::new();
        for (i, address) in shared.addresses_in_order() {
            let request = IstioCertificateRequest {
                csr: csr.clone(),
                validity_duration: ttl
                    .map_or(0, |t| i64::try_from(t.as_secs()).unwrap_or(i64::MAX)),
                metadata: None,
            };
            match self
                .call(address, request, credentials.as_deref(), token.as_ref())
                .await
            {
                Ok(response) => {
                    shared.answered(i);
                    return self.accept(address, response);
                }
                Err(Call::Unreachable(why)) => unreachable.push(format!("{}: {why}", address.text)),
                Err(Call::Refused(status)) => {
                    shared.answered(i);
                    return Err((
                        SourceState::Refused,
                        format!(
                            "the CA at {} refused the certificate request: {:?}: {}",
                            address.text,
                            status.code(),
                            status.message()
                        ),
                    ));
                }
            }
        }
        Err((
            SourceState::Lost,
            format!("no control plane answered: {}", unreachable.join("; ")),
        ))
    }

    async fn call(
        &self,
        address: &Address,
        request: IstioCertificateRequest,
        credentials: Option<&meshward_identity::WorkloadCredentials>,
        token: Option<&token::Token>,
    ) -> Result<meshward_proto::ca::IstioCertificateResponse, Call> {
        let channel = connect::channel(&self.shared, address, credentials)
            .await
            .map_err(Call::Unreachable)?;
        let mut client =
            IstioCertificateServiceClient::new(channel).max_decoding_message_size(MAX_RESPONSE);
        let mut request = tonic::Request::new(request);
        request.set_timeout(CALL_TIMEOUT);
        if let Some(token) = token {
            let value = format!("Bearer {}", token.raw).parse().map_err(|_| {
                Call::Refused(tonic::Status::invalid_argument(
                    "the bootstrap token holds characters a header cannot carry",
                ))
            })?;
            request.metadata_mut().insert("authorization", value);
        }
        match client.create_certificate(request).await {
            Ok(r) => Ok(r.into_inner()),
            Err(status) if connect::is_unavailable(&status) => Err(Call::Unreachable(format!(
                "{:?}: {}",
                status.code(),
                connect::error_chain(&status)
            ))),
            Err(status) => Err(Call::Refused(status)),
        }
    }

    /// Checks the response: a chain (leaf first) that verifies to the
    /// roots sent with it (or, without roots, to the bundle held now).
    /// The roots become the trust bundle.
    fn accept(
        &self,
        address: &Address,
        response: meshward_proto::ca::IstioCertificateResponse,
    ) -> Result<Vec<CertificateDer<'static>>, (SourceState, String)> {
        let bad = |what: String| {
            (
                SourceState::Refused,
                format!("the CA at {} answered with {what}", address.text),
            )
        };
        let origin = std::path::Path::new("CreateCertificate response");
        let mut chain = Vec::new();
        for (n, pem) in response.cert_chain.iter().enumerate() {
            let certs = meshward_identity::pem::certs_from_pem(pem.as_bytes(), origin)
                .map_err(|e| bad(format!("an unreadable cert_chain[{n}]: {e}")))?;
            chain.extend(certs);
        }
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Err(bad("an empty certificate chain".to_string()));
        };
        let roots = response
            .root_cert
            .map(|r| r.ca_cert.join("\n"))
            .unwrap_or_default();
        let bundle = if roots.trim().is_empty() {
            None
        } else {
            Some(
                TrustBundle::from_pem(roots.as_bytes(), origin)
                    .map_err(|e| bad(format!("unusable roots: {e}")))?,
            )
        };
        let verify_with = bundle
            .clone()
            .unwrap_or_else(|| (**self.shared.bundle.borrow()).clone());
        SvidVerifier::new(
            verify_with,
            TrustDomains::only([self.shared.control_id.trust_domain()]),
        )
        .verify_now(leaf, intermediates, Side::Client)
        .map_err(|e| bad(format!("a certificate the mesh would not accept: {e}")))?;
        if let Some(bundle) = bundle {
            self.shared.set_bundle(bundle);
        }
        Ok(chain)
    }
}

enum Call {
    /// Not reached, or going away: try the next address.
    Unreachable(String),
    /// The CA answered no.
    Refused(tonic::Status),
}

impl CaClient for GrpcCa {
    fn sign(
        &self,
        csr_der: Vec<u8>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'_, Result<Vec<CertificateDer<'static>>, CaClientError>> {
        Box::pin(async move {
            match self.sign_pem(csr_der, ttl).await {
                Ok(chain) => Ok(chain),
                Err((state, why)) => {
                    // Shown in /config_dump and the source metrics; the
                    // proxy keeps its certificate while it is valid.
                    self.shared
                        .publisher
                        .problem(Source::Certs, state, why.clone());
                    Err(match state {
                        SourceState::Lost => CaClientError::Unavailable { reason: why },
                        _ => CaClientError::Refused(IssueError::Sign { reason: why }),
                    })
                }
            }
        })
    }
}
