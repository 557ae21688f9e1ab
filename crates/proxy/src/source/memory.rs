//! An in-process source (feature `test-util`): tests push configuration
//! and credentials, and the proxy applies them as it would a file change
//! or a control-plane push.

use std::path::Path;
use std::sync::Arc;

use meshward_config::{Diagnostics, Loader};
use meshward_identity::{TrustBundle, WorkloadCredentials};

use super::{
    ConfigUpdate, Credentials, Feed, LocalFiles, Publisher, Source, SourceInfo, SourceState,
};

/// The sending side of an in-process source.
#[derive(Debug)]
pub struct MemorySource {
    publisher: Publisher,
}

/// Why pushed credentials could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("invalid configuration:\n{0}")]
    Config(Diagnostics),
    #[error("private key: {0}")]
    Key(#[from] meshward_identity::pem::PemError),
    #[error("certificate chain: {0}")]
    Chain(#[from] meshward_identity::CredentialsError),
    #[error("trust bundle: {0}")]
    Bundle(#[from] meshward_identity::bundle::BundleError),
}

impl MemorySource {
    /// A source that has published nothing yet, and the feed the proxy
    /// starts from (the proxy waits for a configuration and credentials).
    pub fn new() -> (MemorySource, Feed) {
        let (publisher, feed) = Publisher::new(SourceInfo {
            kind: "memory",
            config: vec!["memory".to_string()],
            credentials: vec!["memory".to_string()],
            watched: true,
            rescan: None,
        });
        (MemorySource { publisher }, feed)
    }

    /// Validates YAML documents (`(name, text)`, as files would hold
    /// them) and publishes them; what does not validate is published as
    /// refused, and returned.
    pub fn push_yaml(&self, documents: &[(&str, &str)]) -> Result<(), PushError> {
        let mut loader = Loader::new();
        for (name, text) in documents {
            loader.add_source(name, text);
        }
        match loader.finish() {
            Ok(loaded) => {
                self.publisher.config(ConfigUpdate::from(loaded));
                Ok(())
            }
            Err(diags) => Err(self.refused(Source::Config, PushError::Config(diags))),
        }
    }

    /// Publishes `e` as the source's refusal of what it was given (as the
    /// file source does with files that do not load), and returns it.
    fn refused(&self, source: Source, e: PushError) -> PushError {
        self.publisher
            .problem(source, SourceState::Refused, e.to_string());
        e
    }

    /// Publishes credentials from PEM: the chain (leaf first), its key
    /// and the trust bundle. What does not parse is published as refused,
    /// and returned.
    pub fn push_credentials_pem(
        &self,
        chain: &str,
        key: &str,
        roots: &str,
    ) -> Result<(), PushError> {
        let parsed = || -> Result<Credentials, PushError> {
            let origin = Path::new("memory");
            let key = meshward_identity::pem::key_from_pem(key.as_bytes(), origin)?;
            let chain = meshward_identity::pem::certs_from_pem(chain.as_bytes(), origin)?;
            Ok(Credentials {
                credentials: WorkloadCredentials::from_parts(key, chain, None)?,
                bundle: TrustBundle::from_pem(roots.as_bytes(), origin)?,
            })
        };
        match parsed() {
            Ok(c) => {
                self.publisher.credentials(c);
                Ok(())
            }
            Err(e) => Err(self.refused(Source::Certs, e)),
        }
    }

    /// Publishes the contents of files DestinationRules name.
    pub fn push_files(&self, files: &[(&str, &[u8])]) {
        let files: LocalFiles = files
            .iter()
            .map(|(p, b)| (p.to_string(), Ok(Arc::<[u8]>::from(*b))))
            .collect();
        self.publisher.files(files);
    }

    /// Says the source cannot provide content now.
    pub fn push_problem(&self, source: Source, state: SourceState, error: &str) {
        self.publisher.problem(source, state, error.to_string());
    }
}
