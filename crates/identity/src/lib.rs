//! Workload identity for the mesh.
//!
//! This crate owns SPIFFE IDs ([`spiffe`]), the certificate authority
//! (self-signed root or plug-in CA in Istio's `cacerts` layout, [`ca`]),
//! CSR-based issuance of X.509-SVIDs ([`issue`]), trust bundles
//! ([`bundle`]), SVID verification and the rustls verifiers built on it
//! ([`verify`]), the rustls credential plumbing ([`credentials`]), and the
//! workload-side rotation schedule ([`rotation`]).
//!
//! It must not do I/O beyond reading and writing the CA and certificate
//! files it is pointed at: transports (the CA's gRPC service, the proxy's
//! listeners) live in `control` and `proxy` and plug in through
//! [`rotation::CaClient`] and the rustls configs of [`credentials`].
//! Private keys never leave the component that generated them; nothing here
//! logs keys or CSRs.

#![forbid(unsafe_code)]

pub mod bundle;
pub mod ca;
pub mod credentials;
pub mod duration;
pub mod inspect;
pub mod issue;
pub mod keys;
pub mod pem;
pub mod rotation;
pub mod spiffe;
pub mod verify;

pub use bundle::TrustBundle;
pub use ca::{
    CaLoadError, CaMaterial, CaOptions, CaSettings, CertificateAuthority, ChosenTrustDomain,
    RootCa, TrustDomainSource,
};
pub use credentials::{
    CredentialResolver, CredentialsError, CredentialsFileError, WorkloadCredentials, client_config,
    server_config,
};
pub use issue::{
    CheckedCsr, CsrRequest, IssueError, IssuedCertificate, WorkloadKey, check_csr, inspect_csr,
};
pub use keys::KeyType;
pub use rotation::{CaClient, Rotation, RotationConfig, spawn_rotation};
pub use spiffe::{SpiffeId, TrustDomain};
pub use verify::{
    Side, SpiffeClientVerifier, SpiffeServerVerifier, SvidError, SvidVerifier, TrustDomains,
    peer_identity,
};
