//! Run-time certificates: a throw-away mesh root and the client and server
//! SVIDs in Istio's workload file layout (the shared test CA,
//! `meshward_test_support::ca`). Nothing is committed; the keys live in the
//! run's work directory only.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, anyhow};
use meshward_test_support::ca::{MeshCa, WorkloadCerts};

pub const NAMESPACE: &str = "bench";
pub const CLIENT_SA: &str = "client";
pub const SERVER_SA: &str = "server";

#[derive(Debug, Clone)]
pub struct Certs {
    pub client: WorkloadCerts,
    pub server: WorkloadCerts,
    /// `spiffe://cluster.local/ns/bench/sa/` and Istio's principal form
    /// (no scheme) of each service account are asked of the CA.
    pub client_id: String,
    pub server_id: String,
    pub client_principal: String,
}

/// A root valid for a day (as `meshward ca init` makes it, organization
/// `meshward-bench`) and the two workload certificates.
pub fn generate(dir: &Path) -> Result<Certs> {
    let ca = MeshCa::generate(
        "cluster.local",
        "meshward-bench",
        Duration::from_secs(24 * 3600),
    )
    .map_err(|e| anyhow!("generating the bench root CA: {e}"))?;
    let issue = |sa: &str| {
        ca.write_workload(&dir.join(sa), NAMESPACE, sa)
            .map_err(|e| anyhow!("issuing the {sa} certificate: {e}"))
    };
    Ok(Certs {
        client: issue(CLIENT_SA)?,
        server: issue(SERVER_SA)?,
        client_id: ca.spiffe_uri(NAMESPACE, CLIENT_SA),
        server_id: ca.spiffe_uri(NAMESPACE, SERVER_SA),
        client_principal: ca.principal(NAMESPACE, CLIENT_SA),
    })
}
