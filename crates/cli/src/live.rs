//! What every live command shares: where the control plane's admin
//! endpoint is, and the view it gives of the mesh.

use std::net::SocketAddr;

use meshward_ops::live::Live;

/// Where the control plane's admin endpoint is (every live command).
#[derive(Debug, clap::Args)]
pub struct ControlArgs {
    /// The control plane's admin address.
    #[arg(long, value_name = "ADDR", env = "MESHWARD_CONTROL_ADMIN", default_value_t = meshward_control::DEFAULT_ADMIN)]
    pub control_admin: SocketAddr,
}

impl ControlArgs {
    /// What the control plane knows.
    pub async fn live(&self) -> anyhow::Result<Live> {
        Ok(Live::fetch(self.control_admin).await?)
    }
}
