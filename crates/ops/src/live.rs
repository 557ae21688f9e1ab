//! What the control plane knows: the proxies connected to it (with their
//! admin addresses and sync state) and the configuration it serves. The
//! live commands start here, as `istioctl` starts from istiod.

use std::net::SocketAddr;

use meshward_config::ConfigSet;
use serde_json::Value;

use crate::OpsError;
use crate::admin::{Side, get_as, get_json};
use crate::mesh::{MeshWorkload, workloads};
use meshward_control::configz::Configz;

/// The control plane's admin address unless told otherwise (`meshward
/// control`'s default `--admin`).
pub const DEFAULT_CONTROL_ADMIN: &str = "127.0.0.1:15014";

/// One proxy as the control plane records it.
#[derive(Debug, Clone)]
pub struct ProxyRecord {
    pub node_id: String,
    /// `namespace/name` of its WorkloadEntry.
    pub workload: String,
    pub identity: Option<String>,
    pub connected: bool,
    /// Its admin listener, as it reported it.
    pub admin: Option<SocketAddr>,
    pub version_sent: Option<String>,
    pub version_acked: Option<String>,
    /// The version and error of its last NACK.
    pub last_nack: Option<(String, String)>,
    pub proxy_version: Option<String>,
}

/// The control plane's view of the mesh.
#[derive(Debug)]
pub struct Live {
    pub control_admin: SocketAddr,
    /// The version of the configuration it serves now.
    pub version: String,
    /// Every proxy it has seen (connected ones first, then by workload).
    pub proxies: Vec<ProxyRecord>,
    /// The configuration it serves.
    pub config: ConfigSet,
}

impl Live {
    /// Asks the control plane at `control_admin`.
    pub async fn fetch(control_admin: SocketAddr) -> Result<Live, OpsError> {
        let (connections, configz) = tokio::join!(
            get_json(Side::Control, control_admin, "/debug/connections"),
            get_as::<Configz>(Side::Control, control_admin, "/debug/configz"),
        );
        let connections = connections.map_err(hint)?;
        let configz = configz?;
        let config = config_of(&configz)?;
        let version = configz.version;
        let mut proxies: Vec<ProxyRecord> = connections["proxies"]
            .as_array()
            .map(|a| a.iter().map(record).collect())
            .unwrap_or_default();
        proxies.sort_by(|a, b| {
            (!a.connected, &a.workload, &a.node_id).cmp(&(!b.connected, &b.workload, &b.node_id))
        });
        Ok(Live {
            control_admin,
            version,
            proxies,
            config,
        })
    }

    /// The workloads of the configuration served.
    pub fn workloads(&self) -> Vec<MeshWorkload> {
        workloads(&self.config)
    }

    /// The connected proxy of `workload` (`NAMESPACE/NAME` or a unique
    /// `NAME`) that has an admin address.
    pub fn proxy(&self, workload: &str) -> Result<&ProxyRecord, OpsError> {
        let all = self.workloads();
        let w = crate::mesh::find(&all, workload)?;
        let key = w.key();
        if !w.has_proxy {
            return Err(OpsError::NotFound(format!(
                "workload {key} runs without a proxy (meshward.io/proxy: \"false\")"
            )));
        }
        let mut candidates = self.proxies.iter().filter(|p| p.workload == key);
        match candidates.find(|p| p.connected && p.admin.is_some()) {
            Some(p) => Ok(p),
            None => Err(OpsError::NotFound(format!(
                "no proxy of {key} is connected to the control plane at {} with an admin address",
                self.control_admin
            ))),
        }
    }

    /// The rule count and origin of the AuthorizationPolicy
    /// `namespace/name` in the configuration served (`0` and `-` when it
    /// is not there).
    pub fn authorization_policy(&self, namespace: &str, name: &str) -> (usize, String) {
        self.config
            .authorization_policies
            .iter()
            .find(|r| r.meta.namespace == namespace && r.meta.name == name)
            .map(|r| {
                (
                    r.spec.rules.len(),
                    format!("{}:{}", r.origin.file, r.origin.line),
                )
            })
            .unwrap_or((0, "-".to_string()))
    }

    /// Every connected proxy with an admin address.
    pub fn reachable(&self) -> impl Iterator<Item = (&ProxyRecord, SocketAddr)> {
        self.proxies
            .iter()
            .filter(|p| p.connected)
            .filter_map(|p| p.admin.map(|a| (p, a)))
    }
}

fn hint(e: OpsError) -> OpsError {
    match e {
        OpsError::Admin {
            what,
            addr,
            path,
            reason,
        } if reason.starts_with("cannot connect") => OpsError::Admin {
            what,
            addr,
            path,
            reason: format!(
                "{reason} (is a control plane running? `meshward up` or `meshward control` start one; --control-admin says where)"
            ),
        },
        e => e,
    }
}

fn record(v: &Value) -> ProxyRecord {
    let s = |k: &str| v[k].as_str().map(str::to_string);
    ProxyRecord {
        node_id: s("node_id").unwrap_or_default(),
        workload: s("workload").unwrap_or_default(),
        identity: s("identity"),
        connected: v["connected"].as_bool().unwrap_or(false),
        admin: v["admin"].as_str().and_then(|a| a.parse().ok()),
        version_sent: s("version_sent"),
        version_acked: s("version_acked"),
        last_nack: v["last_nack"].as_object().map(|n| {
            (
                n.get("version")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                n.get("error")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            )
        }),
        proxy_version: s("proxy_version"),
    }
}

/// The configuration in a `/debug/configz` answer, loaded as the proxies
/// load what is pushed to them.
fn config_of(served: &Configz) -> Result<ConfigSet, OpsError> {
    served
        .load()
        .map(|l| l.config)
        .map_err(|e| OpsError::Config(e.to_string()))
}
