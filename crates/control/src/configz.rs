//! `/debug/configz`, as istiod's: the configuration the control plane
//! serves now, whole, in the form it pushes it, so that the CLI
//! (`meshward analyze --live`, `meshward mtls report --if-strict`,
//! `meshward call` from a workload without a proxy) loads exactly what
//! the proxies load: [`Configz::load`] goes through the same function as
//! the proxy's config stream ([`meshward_config::load_served`]).
//!
//! It holds the documents and the mesh settings; never key material (the
//! trust bundle, public, is left out too: `/certs` of a proxy shows it).

use serde::{Deserialize, Serialize};

use crate::snapshot::Snapshot;

/// The configuration served: `{"version", "documents": [{"origin",
/// "content"}], "mesh_config"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Configz {
    /// The snapshot's version (a digest of the whole configuration; a
    /// workload's pushed version is a digest of its part of it).
    pub version: String,
    /// Every document, in the control plane's load order.
    pub documents: Vec<ConfigzDocument>,
    /// The mesh settings text (`--mesh-config`), as pushed to proxies;
    /// empty for the defaults.
    pub mesh_config: String,
}

/// One document of [`Configz`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigzDocument {
    /// Where the control plane read it, `FILE:LINE` (relative to its
    /// configuration path).
    pub origin: String,
    /// The resource, as JSON.
    pub content: String,
}

/// Why `/debug/configz`'s body could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigzError {
    /// The body is not `/debug/configz` JSON.
    #[error("not /debug/configz JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The configuration does not load (which the control plane would
    /// not serve: a different version of meshward, say).
    #[error("the served configuration does not load:\n{0}")]
    Invalid(meshward_config::Diagnostics),
}

impl Configz {
    /// What `snapshot` serves.
    pub fn of(snapshot: &Snapshot) -> Configz {
        Configz {
            version: snapshot.version().to_string(),
            documents: snapshot
                .documents()
                .map(|(origin, content)| ConfigzDocument {
                    origin: origin.to_string(),
                    content: content.to_string(),
                })
                .collect(),
            mesh_config: snapshot.mesh_config().to_string(),
        }
    }

    /// Parses `/debug/configz`'s body.
    pub fn from_json(body: &str) -> Result<Configz, ConfigzError> {
        Ok(serde_json::from_str(body)?)
    }

    /// Loads it as a proxy loads a push: the resources and mesh settings,
    /// with the warnings of their validation.
    pub fn load(&self) -> Result<meshward_config::Loaded, ConfigzError> {
        let documents = self
            .documents
            .iter()
            .map(|d| (d.origin.as_str(), d.content.as_str()));
        meshward_config::load_served(documents, &self.mesh_config).map_err(ConfigzError::Invalid)
    }
}
