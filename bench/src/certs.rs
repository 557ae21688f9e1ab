//! Run-time certificates: a throw-away root CA and the client and server
//! SVIDs, written in Istio's workload file layout (`key.pem`,
//! `cert-chain.pem` leaf first, `root-cert.pem`). Nothing is committed; the
//! keys live in the run's work directory only.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use meshward_identity::issue::{self, WorkloadKey};
use meshward_identity::{CaOptions, CaSettings, KeyType, RootCa, SpiffeId, TrustDomain};

pub const TRUST_DOMAIN: &str = "cluster.local";
pub const NAMESPACE: &str = "bench";
pub const CLIENT_SA: &str = "client";
pub const SERVER_SA: &str = "server";

/// A directory holding one workload's key, chain and root.
#[derive(Debug, Clone)]
pub struct WorkloadCerts {
    pub dir: PathBuf,
}

impl WorkloadCerts {
    pub fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
    pub fn chain(&self) -> PathBuf {
        self.dir.join("cert-chain.pem")
    }
    pub fn root(&self) -> PathBuf {
        self.dir.join("root-cert.pem")
    }
}

#[derive(Debug, Clone)]
pub struct Certs {
    pub client: WorkloadCerts,
    pub server: WorkloadCerts,
}

/// `spiffe://cluster.local/ns/bench/sa/SA`.
pub fn spiffe_uri(sa: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{sa}")
}

/// Istio's principal form (no scheme): `cluster.local/ns/bench/sa/SA`.
pub fn principal(sa: &str) -> String {
    format!("{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{sa}")
}

/// Makes a self-signed ECDSA P-256 root (as `meshward ca init` does) and
/// issues the two workload certificates (as `meshward ca issue` does).
pub fn generate(dir: &Path) -> Result<Certs> {
    let td = TrustDomain::new(TRUST_DOMAIN)?;
    let lifetime = Duration::from_secs(24 * 3600);
    let root = RootCa::generate(&CaOptions {
        trust_domain: td.clone(),
        organization: "meshward-bench".to_owned(),
        common_name: None,
        key_type: KeyType::EcP256,
        lifetime,
    })
    .context("generating the bench root CA")?;
    let ca = root
        .into_authority(CaSettings::default())
        .context("loading the bench root CA")?;
    let issue_for = |sa: &str| -> Result<WorkloadCerts> {
        let id = SpiffeId::workload(&td, NAMESPACE, sa)?;
        let key = WorkloadKey::generate(KeyType::EcP256)?;
        let csr = key.csr_der(&id)?;
        let issued = ca.sign_csr(&csr, &id, Some(lifetime))?;
        let out = dir.join(sa);
        issue::write_workload_files(&out, &key, &issued, true)
            .with_context(|| format!("writing {}", out.display()))?;
        Ok(WorkloadCerts { dir: out })
    };
    Ok(Certs {
        client: issue_for(CLIENT_SA)?,
        server: issue_for(SERVER_SA)?,
    })
}
