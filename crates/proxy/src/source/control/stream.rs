//! The config stream: `meshward.control.v1.ConfigDiscoveryService/StreamConfig`
//! over mTLS with the workload's current certificate. The proxy subscribes
//! with its node, then answers every response: an ACK (its version and
//! nonce) once the response's documents, mesh settings and trust bundle
//! all loaded and the proxy applied them; otherwise a NACK (the version
//! applied before, the refused nonce, code INVALID_ARGUMENT and the
//! diagnostics, or why the proxy could not apply it, e.g. no WorkloadEntry
//! for it), and what runs stays.
//!
//! A stream that breaks is opened again at once, on the same address and
//! then the others; when none answers, the config source is published as
//! lost (once per outage) and the addresses are tried again after a
//! backoff (exponential with jitter, at most `max_backoff`). The control
//! plane sends its current view on every new stream: that is the resync.

use std::sync::Arc;
use std::time::Duration;

use meshward_identity::verify::TrustDomains;
use meshward_identity::{Side, SvidVerifier, TrustBundle, WorkloadCredentials};
use meshward_proto::config::config_discovery_service_client::ConfigDiscoveryServiceClient;
use meshward_proto::config::{ConfigRequest, ConfigResponse, Node, Status};
use tokio::sync::mpsc;

use super::connect::{self, Address};
use super::{Shared, Source, SourceState, jittered};
use crate::source::{ConfigUpdate, Outcome};

/// google.rpc.Code INVALID_ARGUMENT, the code of a NACK.
const INVALID_ARGUMENT: i32 = 3;

/// The first wait before opening the stream again.
const INITIAL_BACKOFF: Duration = Duration::from_millis(200);

/// How long the proxy may take to apply a configuration before the
/// stream moves on without answering it.
const APPLY_WAIT: Duration = Duration::from_secs(30);

/// The largest response accepted (a mesh's whole configuration).
const MAX_RESPONSE: usize = 64 << 20;

/// Follows the control plane's configuration until the source is dropped.
pub(crate) async fn run(shared: Arc<Shared>, node_id: String) {
    let node = Node {
        id: node_id,
        workload: shared.workload.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        admin_address: String::new(),
    };
    let mut credentials = shared.credentials.subscribe();
    let mut stream = Stream {
        shared: Arc::clone(&shared),
        node,
        applied: String::new(),
    };
    let mut backoff = INITIAL_BACKOFF;
    let mut lost = false;
    loop {
        // The stream is authenticated by the certificate: wait for one.
        if credentials
            .wait_for(|c| {
                c.as_ref()
                    .is_some_and(|c| c.not_after() > std::time::SystemTime::now())
            })
            .await
            .is_err()
        {
            return;
        }
        let mut failures = Vec::new();
        let mut served = false;
        for (i, address) in shared.addresses_in_order() {
            let (answered, why) = stream.follow(address).await;
            // Once an outage is published, its retries log quietly.
            if lost {
                tracing::debug!(target: "meshward::config", control_plane = %address.text, error = %why, "control plane still unreachable");
            } else {
                tracing::warn!(target: "meshward::config", control_plane = %address.text, error = %why, "configuration stream ended");
            }
            failures.push(format!("{}: {why}", address.text));
            if answered {
                shared.answered(i);
                served = true;
                break;
            }
        }
        if shared.publisher.is_closed() {
            return;
        }
        if served {
            // A stream that served us ended (a restart, a rolling update,
            // a replica gone): subscribe again at once, from it, then the
            // others; only a round where none answers counts as lost.
            backoff = INITIAL_BACKOFF;
            lost = false;
            tokio::time::sleep(jittered(INITIAL_BACKOFF / 4)).await;
            continue;
        }
        if !lost {
            lost = true;
            shared.publisher.problem(
                Source::Config,
                SourceState::Lost,
                format!(
                    "no control plane answers ({}); keeping the configuration applied, version {:?}",
                    failures.join("; "),
                    stream.applied
                ),
            );
        }
        tokio::time::sleep(jittered(backoff)).await;
        backoff = (backoff * 2).min(shared.max_backoff);
    }
}

/// One proxy's subscription: who it is and the version it applied.
struct Stream {
    shared: Arc<Shared>,
    node: Node,
    /// The version last applied (empty before the first).
    applied: String,
}

impl Stream {
    /// The node, with the proxy's admin address once it is bound (the
    /// first subscription may come before it is; the ACK of the first
    /// configuration carries it).
    fn node(&mut self) -> Node {
        if self.node.admin_address.is_empty()
            && let Some(admin) = self.shared.publisher.admin_address()
        {
            self.node.admin_address = admin.to_string();
        }
        self.node.clone()
    }

    /// Opens the stream on `address` and follows it until it ends.
    /// Returns whether a response arrived, and why it ended.
    async fn follow(&mut self, address: &Address) -> (bool, String) {
        let credentials = self.shared.valid_credentials();
        let channel = match connect::channel(&self.shared, address, credentials.as_deref()).await {
            Ok(c) => c,
            Err(e) => return (false, e),
        };
        let mut client =
            ConfigDiscoveryServiceClient::new(channel).max_decoding_message_size(MAX_RESPONSE);
        let (tx, rx) = mpsc::channel::<ConfigRequest>(4);
        let subscribe = ConfigRequest {
            version_info: String::new(),
            node: Some(self.node()),
            response_nonce: String::new(),
            error_detail: None,
        };
        // The channel holds 4: this cannot wait.
        if tx.try_send(subscribe).is_err() {
            return (false, "cannot queue the subscription".to_string());
        }
        let requests =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|r| (r, rx)) },
            );
        let mut responses = match client.stream_config(requests).await {
            Ok(r) => r.into_inner(),
            Err(status) => return (false, describe(&status)),
        };
        let mut answered = false;
        loop {
            let response = match responses.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return (answered, "the control plane closed the stream".to_string()),
                Err(status) => return (answered, describe(&status)),
            };
            answered = true;
            let Some(reply) = self.answer(address, response).await else {
                continue;
            };
            if tx.send(reply).await.is_err() {
                return (answered, "the stream closed".to_string());
            }
        }
    }

    /// Loads a response whole, publishes it and waits for the proxy to
    /// apply it: the ACK, or the NACK with why it did not load or was not
    /// applied. `None`: no answer (the proxy took up a newer update first,
    /// or is not running).
    async fn answer(
        &mut self,
        address: &Address,
        response: ConfigResponse,
    ) -> Option<ConfigRequest> {
        let version = response.version_info.clone();
        let nonce = response.nonce.clone();
        let credentials = self.shared.valid_credentials();
        let loaded = load(response, credentials.as_deref(), &self.shared);
        let refused = match loaded {
            Ok((mut update, bundle)) => {
                let (outcome, applied) = Outcome::new();
                update.outcome = Some(outcome);
                self.shared.publisher.config(update);
                match tokio::time::timeout(APPLY_WAIT, applied).await {
                    Ok(Ok(Ok(_))) => {
                        // The roots with the configuration they came with.
                        if let Some(bundle) = bundle {
                            self.shared.set_bundle(bundle);
                        }
                        tracing::info!(target: "meshward::config", control_plane = %address.text, version = %version, "configuration applied");
                        self.applied = version.clone();
                        return Some(ConfigRequest {
                            version_info: version,
                            node: Some(self.node()),
                            response_nonce: nonce,
                            error_detail: None,
                        });
                    }
                    // The proxy refused it (it logged why, and shows it).
                    Ok(Ok(Err(message))) => format!("the proxy cannot apply it: {message}"),
                    Ok(Err(_superseded)) => return None,
                    Err(_) => {
                        tracing::warn!(target: "meshward::config", control_plane = %address.text, version = %version, "the proxy did not apply the configuration in {}s; not answering", APPLY_WAIT.as_secs());
                        return None;
                    }
                }
            }
            Err(message) => {
                tracing::error!(target: "meshward::config", control_plane = %address.text, version = %version, error = %message, "configuration refused; keeping the configuration applied");
                self.shared.publisher.problem(
                    Source::Config,
                    SourceState::Refused,
                    format!("version {version:?} from {}: {message}", address.text),
                );
                message
            }
        };
        Some(ConfigRequest {
            version_info: self.applied.clone(),
            node: Some(self.node()),
            response_nonce: nonce,
            error_detail: Some(Status {
                code: INVALID_ARGUMENT,
                message: refused,
            }),
        })
    }
}

/// The response's configuration and trust bundle, or why they do not load.
/// A trust bundle must verify the proxy's own certificate (`credentials`):
/// one that does not (the old root retired before this proxy was issued a
/// certificate under the new one) would have its peers refused by it, and
/// is NACKed, so that the control plane shows which proxies lag.
fn load(
    response: ConfigResponse,
    credentials: Option<&WorkloadCredentials>,
    shared: &Shared,
) -> Result<(ConfigUpdate, Option<TrustBundle>), String> {
    let bundle = if response.trust_bundle.is_empty() {
        None
    } else {
        let pem = response.trust_bundle.join("\n");
        let bundle = TrustBundle::from_pem(pem.as_bytes(), std::path::Path::new("trust_bundle"))
            .map_err(|e| format!("trust bundle: {e}"))?;
        if bundle.is_empty() {
            return Err("trust bundle: no certificate".to_string());
        }
        if let Some(c) = credentials
            && let Some((leaf, intermediates)) = c.chain().split_first()
        {
            SvidVerifier::new(
                bundle.clone(),
                TrustDomains::only([shared.control_id.trust_domain()]),
            )
            .verify_now(leaf, intermediates, Side::Client)
            .map_err(|e| {
                format!(
                    "trust bundle: it would not verify this proxy's own certificate ({}): {e}",
                    c.id()
                )
            })?;
        }
        Some(bundle)
    };
    let documents = response
        .documents
        .iter()
        .map(|d| (d.origin.as_str(), d.content.as_str()));
    let loaded = meshward_config::load_served(documents, &response.mesh_config)
        .map_err(|d| d.to_string())?;
    Ok((ConfigUpdate::from(loaded), bundle))
}

fn describe(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), connect::error_chain(status))
}
