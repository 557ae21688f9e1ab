//! Trust bundles: the set of roots a workload trusts. Several roots can be
//! trusted at once, for root rotation (old and new root overlap) and for
//! clusters that share a root but have their own intermediates.

use std::path::Path;

use rustls_pki_types::{CertificateDer, TrustAnchor};

use crate::pem::{self, PemError};

/// Why a trust bundle could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error("root #{index} cannot be used as a trust anchor: {reason}")]
    BadRoot { index: usize, reason: String },
}

/// A set of trusted root certificates (deduplicated, in insertion order).
#[derive(Debug, Clone, Default)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl TrustBundle {
    /// An empty bundle (trusts nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// A bundle of the given roots.
    pub fn from_roots(
        roots: impl IntoIterator<Item = CertificateDer<'static>>,
    ) -> Result<Self, BundleError> {
        let mut bundle = Self::new();
        for root in roots {
            bundle.add(root)?;
        }
        Ok(bundle)
    }

    /// A bundle of every certificate in a PEM document.
    pub fn from_pem(pem: &[u8], origin: &Path) -> Result<Self, BundleError> {
        Self::from_roots(pem::certs_from_pem(pem, origin)?)
    }

    /// A bundle of every certificate in a PEM file (e.g. `root-cert.pem`).
    pub fn from_pem_file(path: &Path) -> Result<Self, BundleError> {
        Self::from_roots(pem::read_certs(path)?)
    }

    /// Adds a root; returns false if it was already trusted.
    pub fn add(&mut self, root: CertificateDer<'static>) -> Result<bool, BundleError> {
        if self.roots.contains(&root) {
            return Ok(false);
        }
        let anchor = webpki::anchor_from_trusted_cert(&root)
            .map_err(|e| BundleError::BadRoot {
                index: self.roots.len(),
                reason: e.to_string(),
            })?
            .to_owned();
        self.roots.push(root);
        self.anchors.push(anchor);
        Ok(true)
    }

    /// Adds every root of `other`.
    pub fn merge(&mut self, other: &TrustBundle) {
        for (root, anchor) in other.roots.iter().zip(&other.anchors) {
            if !self.roots.contains(root) {
                self.roots.push(root.clone());
                self.anchors.push(anchor.clone());
            }
        }
    }

    /// Stops trusting a root (end of a rotation overlap); returns whether it was present.
    pub fn remove(&mut self, root: &CertificateDer<'_>) -> bool {
        match self.roots.iter().position(|r| r.as_ref() == root.as_ref()) {
            Some(i) => {
                self.roots.remove(i);
                self.anchors.remove(i);
                true
            }
            None => false,
        }
    }

    /// The trusted roots.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The roots as webpki trust anchors.
    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    /// Number of roots.
    pub fn len(&self) -> usize {
        self.roots.len()
    }

    /// Whether the bundle trusts nothing.
    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    /// The bundle as concatenated PEM certificates.
    pub fn to_pem(&self) -> String {
        pem::encode_certs(&self.roots)
    }
}
