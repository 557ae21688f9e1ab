//! One accepted state of the config source, and the view of it that one
//! workload receives.
//!
//! A [`Snapshot`] keeps every document the loader accepted, in load order
//! (a document redefined later, as `kubectl apply` of both would leave it,
//! keeps the place of the first definition with the content of the last,
//! exactly as `meshward_config::Loader` orders resources), each re-serialized
//! as JSON from the parsed YAML (YAML ⊃ JSON, so the proxy's own loader reads
//! it back as the same resource). [`Snapshot::for_workload`] picks what one
//! workload needs; its version is a digest of what it holds, so a change
//! that does not concern a workload leaves its version alone and is not
//! pushed to it.
//!
//! Versions are SHA-256 prefixes of content only (documents, their origins
//! relative to the configured path, the mesh settings, the trust bundle):
//! two replicas over the same directory serve the same versions, and a
//! proxy that fails over from one to the other sees no change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use aws_lc_rs::digest::{Context, SHA256};
use meshward_config::yaml::{self, Node};
use meshward_config::{ConfigSet, Kind, Loaded, ObjectMeta, WorkloadSelector};
use meshward_identity::TrustBundle;
use meshward_policy::Workload;
use meshward_proto::config::{ConfigResponse, Document};

/// The text of one configuration source, as the source read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceText {
    /// The name the loader reports diagnostics under (the file's path).
    pub name: String,
    /// The name pushed to proxies: the path relative to the configured
    /// path, so that replicas that mount the directory at different places
    /// push the same origins (and versions).
    pub origin: String,
    /// The file's content.
    pub text: String,
}

/// Why a snapshot could not be built from a successful load.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The loader accepted a resource whose document the source did not
    /// read (a file changed between two reads); the next scan retries.
    #[error(
        "{kind} {namespace}/{name} was loaded but its document was not read; the files changed while being read"
    )]
    MissingDocument {
        /// Kind of the resource.
        kind: Kind,
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
}

/// Why a workload has no view.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ViewError {
    /// No WorkloadEntry of that namespace and name is in the snapshot.
    #[error("workload {namespace}/{name} is not in the configuration (version {version})")]
    UnknownWorkload {
        /// The namespace asked for.
        namespace: String,
        /// The name asked for.
        name: String,
        /// The snapshot's version.
        version: String,
    },
}

/// Which workloads a document concerns.
#[derive(Debug, Clone)]
enum Scope {
    /// Every workload (WorkloadEntry, ServiceEntry, DestinationRule,
    /// MeshConfig: the proxy routes, does auto-mTLS and applies `exportTo`
    /// by them).
    All,
    /// A policy of `namespace` (PeerAuthentication, AuthorizationPolicy,
    /// RequestAuthentication): the workloads of that namespace, or of every
    /// namespace when it is the root namespace, that its selector matches.
    Policy {
        namespace: String,
        selector: Option<WorkloadSelector>,
        /// Attached by `targetRef(s)`: sent conservatively (the proxy
        /// decides that such a policy does not apply to a sidecar).
        attached: bool,
    },
}

#[derive(Debug, Clone)]
struct SnapshotDocument {
    origin: String,
    content: String,
    scope: Scope,
}

/// One accepted state of the source.
#[derive(Debug)]
pub struct Snapshot {
    version: String,
    config: Arc<ConfigSet>,
    documents: Vec<SnapshotDocument>,
    mesh_config: String,
    accepted_at: Instant,
    accepted_wall: SystemTime,
    /// WorkloadEntries by namespace and name: index in `config`.
    workloads: HashMap<(String, String), usize>,
    /// The documents each workload asked for so far needs: computed once
    /// per snapshot, however many proxies serve the workload.
    selections: Mutex<HashMap<(String, String), Arc<Selection>>>,
}

/// The documents one workload needs, and their digest.
#[derive(Debug)]
struct Selection {
    documents: Vec<Document>,
    digest: [u8; 32],
}

/// What one workload receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadView {
    /// Digest of everything below.
    pub version: String,
    /// The documents the workload needs, in load order.
    pub documents: Vec<Document>,
    /// The mesh settings text (`--mesh-config`), empty for none.
    pub mesh_config: String,
    /// The trusted roots, one PEM certificate each.
    pub trust_bundle: Vec<String>,
}

impl WorkloadView {
    /// The response that carries this view, with `nonce`.
    pub fn to_response(&self, nonce: String) -> ConfigResponse {
        ConfigResponse {
            version_info: self.version.clone(),
            documents: self.documents.clone(),
            mesh_config: self.mesh_config.clone(),
            nonce,
            trust_bundle: self.trust_bundle.clone(),
        }
    }
}

impl Snapshot {
    /// Builds the snapshot of a successful load of `sources` (the texts the
    /// loader was given, in the same order) and of the mesh settings text.
    pub fn build(
        loaded: &Loaded,
        sources: &[SourceText],
        mesh_config: Option<&SourceText>,
    ) -> Result<Snapshot, SnapshotError> {
        let config = &loaded.config;
        let mut docs: Vec<RawDocument> = Vec::new();
        let mut index: HashMap<(Kind, String, String), usize> = HashMap::new();
        for source in sources {
            // The loader accepted this text, so it parses.
            let _ = yaml::for_each_document(&source.text, |doc| {
                collect(&source.origin, &doc.root, &mut docs, &mut index);
            });
        }
        let typed = typed_resources(config);
        let mut documents = Vec::with_capacity(docs.len());
        for mut doc in docs {
            let key = (doc.kind, doc.namespace.clone(), doc.name.clone());
            let scope = if doc.kind == Kind::MeshConfig {
                Scope::All
            } else {
                let Some(t) = typed.get(&key) else {
                    return Err(SnapshotError::MissingDocument {
                        kind: doc.kind,
                        namespace: doc.namespace,
                        name: doc.name,
                    });
                };
                // A redefinition keeps the creation time of the first
                // definition (see `Loader`): so does the pushed document.
                set_creation_timestamp(&mut doc.json, t.meta.creation_timestamp.as_deref());
                match &t.policy {
                    None => Scope::All,
                    Some((selector, attached)) => Scope::Policy {
                        namespace: doc.namespace.clone(),
                        selector: selector.clone(),
                        attached: *attached,
                    },
                }
            };
            documents.push(SnapshotDocument {
                origin: format!("{}:{}", doc.origin, doc.line),
                content: doc.json.to_string(),
                scope,
            });
        }
        // Every typed resource has its document unless a file changed
        // between two reads (the other direction is checked above).
        if let Some((kind, namespace, name)) = typed.keys().find(|k| !index.contains_key(*k)) {
            return Err(SnapshotError::MissingDocument {
                kind: *kind,
                namespace: namespace.clone(),
                name: name.clone(),
            });
        }
        let mesh_text = mesh_config.map(|m| m.text.clone()).unwrap_or_default();
        let mut h = Context::new(&SHA256);
        for d in &documents {
            feed(&mut h, d.origin.as_bytes());
            feed(&mut h, d.content.as_bytes());
        }
        feed(&mut h, mesh_text.as_bytes());
        let workloads = config
            .workload_entries
            .iter()
            .enumerate()
            .map(|(i, w)| ((w.meta.namespace.clone(), w.meta.name.clone()), i))
            .collect();
        Ok(Snapshot {
            version: hex_prefix(h),
            config: Arc::new(config.clone()),
            documents,
            mesh_config: mesh_text,
            accepted_at: Instant::now(),
            accepted_wall: SystemTime::now(),
            workloads,
            selections: Mutex::new(HashMap::new()),
        })
    }

    /// The snapshot's version: a digest of its content.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The validated resources.
    pub fn config(&self) -> &Arc<ConfigSet> {
        &self.config
    }

    /// How many documents the snapshot holds.
    pub fn document_count(&self) -> usize {
        self.documents.len()
    }

    /// Every document, `(origin, content)`, in load order (what
    /// `/debug/configz` serves).
    pub fn documents(&self) -> impl Iterator<Item = (&str, &str)> {
        self.documents
            .iter()
            .map(|d| (d.origin.as_str(), d.content.as_str()))
    }

    /// The mesh settings text as pushed to proxies (empty for none).
    pub fn mesh_config(&self) -> &str {
        &self.mesh_config
    }

    /// When the source accepted this snapshot (for the convergence time).
    pub fn accepted_at(&self) -> Instant {
        self.accepted_at
    }

    /// When the source accepted this snapshot, wall clock.
    pub fn accepted_wall(&self) -> SystemTime {
        self.accepted_wall
    }

    /// The workload a WorkloadEntry `namespace/name` describes (its
    /// service account `default` when it names none), if there is one.
    pub fn workload(&self, namespace: &str, name: &str) -> Option<Workload> {
        self.workloads
            .get(&(namespace.to_string(), name.to_string()))
            .and_then(|&i| self.config.workload_entries.get(i))
            .map(Workload::from_entry)
    }

    /// What workload `namespace/name` needs, with `bundle` as its roots.
    pub fn for_workload(
        &self,
        namespace: &str,
        name: &str,
        bundle: &TrustBundle,
    ) -> Result<WorkloadView, ViewError> {
        let Some(workload) = self.workload(namespace, name) else {
            return Err(ViewError::UnknownWorkload {
                namespace: namespace.to_string(),
                name: name.to_string(),
                version: self.version.clone(),
            });
        };
        let selection = self.selection(namespace, name, &workload);
        let trust_bundle: Vec<String> = bundle
            .roots()
            .iter()
            .map(|r| meshward_identity::pem::encode_certs([r]))
            .collect();
        let mut h = Context::new(&SHA256);
        feed(&mut h, &selection.digest);
        feed(&mut h, self.mesh_config.as_bytes());
        for r in &trust_bundle {
            feed(&mut h, r.as_bytes());
        }
        Ok(WorkloadView {
            version: hex_prefix(h),
            documents: selection.documents.clone(),
            mesh_config: self.mesh_config.clone(),
            trust_bundle,
        })
    }
}

impl Snapshot {
    /// The documents `workload` needs (cached per snapshot).
    fn selection(&self, namespace: &str, name: &str, workload: &Workload) -> Arc<Selection> {
        let key = (namespace.to_string(), name.to_string());
        if let Some(s) = self.lock_selections().get(&key) {
            return Arc::clone(s);
        }
        let root = self.config.mesh.root_namespace.as_str();
        let documents: Vec<Document> = self
            .documents
            .iter()
            .filter(|d| match &d.scope {
                Scope::All => true,
                Scope::Policy {
                    namespace: ns,
                    selector,
                    attached,
                } => {
                    (ns == root || *ns == workload.namespace)
                        && (*attached
                            || selector
                                .as_ref()
                                .is_none_or(|s| s.matches(&workload.labels)))
                }
            })
            .map(|d| Document {
                origin: d.origin.clone(),
                content: d.content.clone(),
            })
            .collect();
        let mut h = Context::new(&SHA256);
        for d in &documents {
            feed(&mut h, d.origin.as_bytes());
            feed(&mut h, d.content.as_bytes());
        }
        let mut digest = [0; 32];
        digest.copy_from_slice(h.finish().as_ref());
        let selection = Arc::new(Selection { documents, digest });
        // Bounded by the number of WorkloadEntries: only those get here.
        self.lock_selections().insert(key, Arc::clone(&selection));
        selection
    }

    fn lock_selections(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(String, String), Arc<Selection>>> {
        // A cache: a panic elsewhere leaves it usable.
        self.selections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A resource document as read, before its scope is known.
struct RawDocument {
    kind: Kind,
    namespace: String,
    name: String,
    origin: String,
    line: u32,
    json: serde_json::Value,
}

/// Adds the resources of one document (a `v1` `List`'s items one by one,
/// as the loader does), skipping kinds meshward does not act on.
fn collect(
    origin: &str,
    root: &Node,
    docs: &mut Vec<RawDocument>,
    index: &mut HashMap<(Kind, String, String), usize>,
) {
    let api_version = root.get("apiVersion").and_then(Node::as_str);
    let kind_name = root.get("kind").and_then(Node::as_str);
    let (Some(api_version), Some(kind_name)) = (api_version, kind_name) else {
        return;
    };
    if kind_name == "List" && api_version == "v1" {
        if let Some(yaml::Value::Seq(items)) = root.get("items").map(|n| &n.value) {
            for item in items {
                collect(origin, item, docs, index);
            }
        }
        return;
    }
    let Some(kind) = kind_of(api_version, kind_name) else {
        return;
    };
    let meta = root.get("metadata");
    let field = |k: &str| meta.and_then(|m| m.get(k)).and_then(Node::as_str);
    let namespace = field("namespace").unwrap_or("default").to_string();
    let name = field("name").unwrap_or_default().to_string();
    let doc = RawDocument {
        kind,
        namespace: namespace.clone(),
        name: name.clone(),
        origin: origin.to_string(),
        line: root.pos.line,
        json: root.to_json(),
    };
    match index.get(&(kind, namespace.clone(), name.clone())) {
        // The later definition replaces the earlier in its place (the
        // MeshConfig kind cannot be defined twice: the load failed then).
        Some(&i) => docs[i] = doc,
        None => {
            index.insert((kind, namespace, name), docs.len());
            docs.push(doc);
        }
    }
}

/// The kind the loader reads a document as, by the same group rule.
fn kind_of(api_version: &str, kind: &str) -> Option<Kind> {
    let group = api_version.split_once('/').map_or("", |(g, _)| g);
    let (kind, expected) = match kind {
        "PeerAuthentication" => (Kind::PeerAuthentication, "security.istio.io"),
        "AuthorizationPolicy" => (Kind::AuthorizationPolicy, "security.istio.io"),
        "RequestAuthentication" => (Kind::RequestAuthentication, "security.istio.io"),
        "DestinationRule" => (Kind::DestinationRule, "networking.istio.io"),
        "ServiceEntry" => (Kind::ServiceEntry, "networking.istio.io"),
        "WorkloadEntry" => (Kind::WorkloadEntry, "networking.istio.io"),
        "MeshConfig" => (Kind::MeshConfig, "meshward.io"),
        _ => return None,
    };
    (group == expected).then_some(kind)
}

/// What the snapshot needs of a typed resource: its metadata and, for a
/// policy, its selector and whether it is attached by target reference.
struct Typed<'c> {
    meta: &'c ObjectMeta,
    policy: Option<(Option<WorkloadSelector>, bool)>,
}

fn typed_resources(config: &ConfigSet) -> HashMap<(Kind, String, String), Typed<'_>> {
    let mut out = HashMap::new();
    let key = |kind: Kind, m: &ObjectMeta| (kind, m.namespace.clone(), m.name.clone());
    for r in &config.peer_authentications {
        out.insert(
            key(Kind::PeerAuthentication, &r.meta),
            Typed {
                meta: &r.meta,
                policy: Some((r.spec.selector.clone(), !r.spec.target_refs.is_empty())),
            },
        );
    }
    for r in &config.authorization_policies {
        out.insert(
            key(Kind::AuthorizationPolicy, &r.meta),
            Typed {
                meta: &r.meta,
                policy: Some((r.spec.selector.clone(), !r.spec.target_refs.is_empty())),
            },
        );
    }
    for r in &config.request_authentications {
        out.insert(
            key(Kind::RequestAuthentication, &r.meta),
            Typed {
                meta: &r.meta,
                policy: Some((r.spec.selector.clone(), !r.spec.target_refs.is_empty())),
            },
        );
    }
    let all = |meta| Typed { meta, policy: None };
    for r in &config.destination_rules {
        out.insert(key(Kind::DestinationRule, &r.meta), all(&r.meta));
    }
    for r in &config.service_entries {
        out.insert(key(Kind::ServiceEntry, &r.meta), all(&r.meta));
    }
    for r in &config.workload_entries {
        out.insert(key(Kind::WorkloadEntry, &r.meta), all(&r.meta));
    }
    out
}

fn set_creation_timestamp(json: &mut serde_json::Value, ts: Option<&str>) {
    let Some(meta) = json.get_mut("metadata").and_then(|m| m.as_object_mut()) else {
        return;
    };
    match ts {
        Some(ts) => {
            meta.insert(
                "creationTimestamp".to_string(),
                serde_json::Value::String(ts.to_string()),
            );
        }
        None => {
            meta.remove("creationTimestamp");
        }
    }
}

/// Length-prefixed, so that no two sequences of fields hash alike.
fn feed(h: &mut Context, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

/// The first 8 bytes of the digest, in hex.
fn hex_prefix(h: Context) -> String {
    h.finish()
        .as_ref()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}
