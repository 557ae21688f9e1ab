//! Loading files and directories into a validated [`ConfigSet`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::decode::{self, Fields};
use crate::diag::{Diagnostic, Diagnostics, Severity, Sink};
use crate::model::mesh::MeshConfig;
use crate::model::networking::{DestinationRule, ServiceEntry, WorkloadEntry};
use crate::model::security::{
    Action, AuthorizationPolicy, PeerAuthentication, RequestAuthentication,
};
use crate::model::{ObjectMeta, Origin, Resource, check_name, check_namespace};
use crate::yaml::{self, Node, Pos};

/// Largest configuration file accepted.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// The kinds meshward acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    PeerAuthentication,
    AuthorizationPolicy,
    RequestAuthentication,
    DestinationRule,
    ServiceEntry,
    WorkloadEntry,
    MeshConfig,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::RequestAuthentication => "RequestAuthentication",
            Kind::DestinationRule => "DestinationRule",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::WorkloadEntry => "WorkloadEntry",
            Kind::MeshConfig => "MeshConfig",
        }
    }

    /// The API group and versions a kind is accepted in.
    fn api(self) -> (&'static str, &'static [&'static str]) {
        match self {
            Kind::PeerAuthentication | Kind::AuthorizationPolicy | Kind::RequestAuthentication => {
                ("security.istio.io", &["v1", "v1beta1"])
            }
            Kind::DestinationRule | Kind::ServiceEntry | Kind::WorkloadEntry => {
                ("networking.istio.io", &["v1", "v1beta1", "v1alpha3"])
            }
            Kind::MeshConfig => ("meshward.io", &["v1alpha1"]),
        }
    }

    fn from_name(name: &str) -> Option<Kind> {
        Some(match name {
            "PeerAuthentication" => Kind::PeerAuthentication,
            "AuthorizationPolicy" => Kind::AuthorizationPolicy,
            "RequestAuthentication" => Kind::RequestAuthentication,
            "DestinationRule" => Kind::DestinationRule,
            "ServiceEntry" => Kind::ServiceEntry,
            "WorkloadEntry" => Kind::WorkloadEntry,
            "MeshConfig" => Kind::MeshConfig,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated set of resources: everything one mesh is configured with.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigSet {
    pub mesh: MeshConfig,
    pub peer_authentications: Vec<Resource<PeerAuthentication>>,
    pub authorization_policies: Vec<Resource<AuthorizationPolicy>>,
    pub request_authentications: Vec<Resource<RequestAuthentication>>,
    pub destination_rules: Vec<Resource<DestinationRule>>,
    pub service_entries: Vec<Resource<ServiceEntry>>,
    pub workload_entries: Vec<Resource<WorkloadEntry>>,
}

impl ConfigSet {
    /// How many resources of each kind the set holds, for summaries.
    pub fn counts(&self) -> Vec<(Kind, usize)> {
        [
            (Kind::PeerAuthentication, self.peer_authentications.len()),
            (Kind::AuthorizationPolicy, self.authorization_policies.len()),
            (
                Kind::RequestAuthentication,
                self.request_authentications.len(),
            ),
            (Kind::DestinationRule, self.destination_rules.len()),
            (Kind::ServiceEntry, self.service_entries.len()),
            (Kind::WorkloadEntry, self.workload_entries.len()),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect()
    }
}

/// A successful load: the set and the warnings found on the way.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: ConfigSet,
    pub warnings: Diagnostics,
    /// How many YAML documents each source held, by the name it was read
    /// under (a file's path as given). A source of only whitespace,
    /// comments and empty documents holds none; a caller watching files
    /// can tell an emptied file from a deleted one (absent here).
    pub documents: BTreeMap<String, usize>,
}

/// Loads files and directories (see [`Loader::add_path`]) all-or-nothing.
pub fn load_paths<P: AsRef<Path>>(paths: &[P]) -> Result<Loaded, Diagnostics> {
    let mut loader = Loader::new();
    for p in paths {
        loader.add_path(p.as_ref());
    }
    loader.finish()
}

/// Accumulates sources, then validates the whole set in [`Loader::finish`].
#[derive(Debug, Default)]
pub struct Loader {
    set: ConfigSet,
    diags: Vec<Diagnostic>,
    order: u32,
    skipped: BTreeMap<String, usize>,
    first_skipped: Option<(Arc<str>, Pos)>,
    mesh_origin: Option<(Arc<str>, u32)>,
    seen: BTreeMap<(Kind, String, String), (Arc<str>, u32)>,
    documents: BTreeMap<String, usize>,
}

/// The files [`Loader::add_path`] reads for `path`, in reading order: the
/// path itself when it is a file, else the `.yaml`, `.yml` and `.json`
/// files under it (hidden entries skipped, symbolic links followed). For
/// those who watch what the loader reads.
pub fn config_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    collect_files(path, &mut files, true)?;
    files.sort();
    Ok(files)
}

impl Loader {
    pub fn new() -> Loader {
        Loader::default()
    }

    /// Adds a file, or every `.yaml`/`.yml`/`.json` file under a directory
    /// (recursively, in sorted path order). Unreadable paths are errors.
    pub fn add_path(&mut self, path: &Path) {
        let files = match config_files(path) {
            Ok(files) => files,
            Err(e) => {
                self.io_error(path, &e);
                return;
            }
        };
        for file in files {
            self.add_file(&file);
        }
    }

    fn add_file(&mut self, file: &Path) {
        if let Some(text) = self.read_text(file) {
            self.add_source(&file.display().to_string(), &text);
        }
    }

    /// Adds a file of mesh settings (see [`Loader::add_mesh_config_source`]).
    pub fn add_mesh_config_path(&mut self, file: &Path) {
        if let Some(text) = self.read_text(file) {
            self.add_mesh_config_source(&file.display().to_string(), &text);
        }
    }

    /// Reads a file, refusing oversized and non-UTF-8 ones.
    fn read_text(&mut self, file: &Path) -> Option<String> {
        let name: Arc<str> = Arc::from(file.display().to_string());
        let start = Pos { line: 1, col: 1 };
        match std::fs::metadata(file) {
            Ok(m) if m.len() > MAX_FILE_BYTES => {
                self.error_at(
                    &name,
                    start,
                    format!("file is larger than {MAX_FILE_BYTES} bytes"),
                );
                return None;
            }
            Err(e) => {
                self.io_error(file, &e);
                return None;
            }
            Ok(_) => {}
        }
        // The size seen above is not enough: a file can grow between the
        // two calls, and a device or a pipe (`/dev/zero`, `<(...)`) says 0.
        // At most one byte more than the bound is read.
        let read = std::fs::File::open(file).and_then(|f| {
            use std::io::Read as _;
            let mut bytes = Vec::new();
            f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
            Ok(bytes)
        });
        match read {
            Ok(bytes) if bytes.len() as u64 > MAX_FILE_BYTES => {
                self.error_at(
                    &name,
                    start,
                    format!("file is larger than {MAX_FILE_BYTES} bytes"),
                );
                None
            }
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => Some(text),
                Err(_) => {
                    self.error_at(&name, start, "file is not valid UTF-8".to_string());
                    None
                }
            },
            Err(e) => {
                self.io_error(file, &e);
                None
            }
        }
    }

    fn io_error(&mut self, path: &Path, e: &std::io::Error) {
        let name: Arc<str> = Arc::from(path.display().to_string());
        self.error_at(&name, Pos { line: 0, col: 0 }, format!("cannot read: {e}"));
    }

    fn error_at(&mut self, file: &Arc<str>, pos: Pos, message: String) {
        self.diags.push(Diagnostic {
            severity: Severity::Error,
            file: file.clone(),
            pos,
            resource: None,
            field: None,
            message,
        });
    }

    /// Adds the documents of one YAML text; `name` is used in diagnostics.
    pub fn add_source(&mut self, name: &str, text: &str) {
        let file: Arc<str> = Arc::from(name);
        // Each document is decoded as soon as it is parsed, and its tree
        // dropped: holding every tree of a large file at once cost more
        // memory than everything else (see docs/PERFORMANCE.md).
        let before = self.diags.len();
        let mut count = 0;
        let parsed = yaml::for_each_document(text, |doc| {
            count += 1;
            self.add_document(&file, &doc.root);
        });
        *self.documents.entry(name.to_string()).or_default() += count;
        if let Err(e) = parsed {
            // A file that does not parse says only that: what its earlier
            // documents said is dropped with them (the load fails anyway,
            // so what they added is never used).
            self.diags.truncate(before);
            self.error_at(&file, e.pos, format!("invalid YAML: {}", e.message));
        }
    }

    /// Adds mesh settings from a `--mesh-config` file, in any of the shapes
    /// users keep them in:
    /// - a bare `meshConfig` block (the content of Istio's `mesh` key);
    /// - Helm values with a top-level `meshConfig:` (other keys, such as
    ///   `global:` or `pilot:`, are skipped with one warning);
    /// - an `IstioOperator` (`install.istio.io/v1alpha1`) with
    ///   `spec.meshConfig` (other `spec` keys, such as `profile`,
    ///   `components` or `values`, are skipped with one warning).
    ///
    /// Errors name the field path as written in the file
    /// (`spec.meshConfig.extensionProviders[0]...`).
    pub fn add_mesh_config_source(&mut self, name: &str, text: &str) {
        let file: Arc<str> = Arc::from(name);
        let node = match yaml::parse_one(text) {
            Ok(Some(node)) => node,
            Ok(None) => {
                self.documents.entry(name.to_string()).or_default();
                return;
            }
            Err(e) => {
                self.error_at(&file, e.pos, format!("invalid YAML: {}", e.message));
                return;
            }
        };
        *self.documents.entry(name.to_string()).or_default() += 1;
        let Some(block) = self.mesh_block(&file, &node) else {
            return;
        };
        if !self.claim_mesh(&file, block.node.pos) {
            return;
        }
        let mut sink = Sink {
            file: file.clone(),
            resource: Some(block.resource),
            out: &mut self.diags,
        };
        if let Some(skipped) = block.skipped {
            sink.warn(
                skipped.pos,
                &skipped.parent,
                format!(
                    "skipped {}: meshward reads only the mesh settings ({})",
                    skipped.keys.join(", "),
                    block.path
                ),
            );
        }
        self.set.mesh = MeshConfig::decode(&mut sink, block.node, &block.path);
    }

    /// Finds the `meshConfig` block of a mesh settings file; `None` (with
    /// an error) when the file is of another kind or has no block.
    fn mesh_block<'n>(&mut self, file: &Arc<str>, root: &'n Node) -> Option<MeshBlock<'n>> {
        let keys = |n: &Node, except: &str| -> Vec<String> {
            match &n.value {
                yaml::Value::Map(entries) => entries
                    .iter()
                    .filter_map(|(k, _)| k.scalar_text())
                    .filter(|k| *k != except)
                    .map(|k| format!("`{k}`"))
                    .collect(),
                _ => Vec::new(),
            }
        };
        let kind = root.get("kind").and_then(Node::as_str);
        if let Some(kind) = kind {
            let api_version = root.get("apiVersion").and_then(Node::as_str).unwrap_or("");
            if kind != "IstioOperator" || !api_version.starts_with("install.istio.io/") {
                self.error_at(
                    file,
                    root.pos,
                    format!(
                        "a mesh settings file holds a meshConfig block, Helm values with `meshConfig:` or an IstioOperator (install.istio.io/v1alpha1), found {kind} {api_version}"
                    ),
                );
                return None;
            }
            let meta = root.get("metadata");
            let field = |k: &str| meta.and_then(|m| m.get(k)).and_then(Node::as_str);
            let resource = format!(
                "IstioOperator {}/{}",
                field("namespace").unwrap_or("istio-system"),
                field("name").unwrap_or_default()
            );
            let spec = root.get("spec").filter(|s| !s.is_null());
            let found = spec.and_then(|s| Some((s, s.get("meshConfig").filter(|b| !b.is_null())?)));
            let Some((spec, block)) = found else {
                self.diags.push(Diagnostic {
                    severity: Severity::Error,
                    file: file.clone(),
                    pos: spec.map_or(root.pos, |s| s.pos),
                    resource: Some(resource),
                    field: Some("spec.meshConfig".into()),
                    message: "missing: the IstioOperator sets no mesh settings".into(),
                });
                return None;
            };
            let mut other = keys(spec, "meshConfig");
            if spec
                .get("values")
                .and_then(|v| v.get("meshConfig"))
                .is_some()
            {
                other.push("`values.meshConfig` (put mesh settings in spec.meshConfig)".into());
            }
            let skipped = (!other.is_empty()).then(|| Skipped {
                pos: spec.pos,
                parent: "spec".into(),
                keys: other,
            });
            return Some(MeshBlock {
                node: block,
                path: "spec.meshConfig".into(),
                resource,
                skipped,
            });
        }
        if let Some(block) = root.get("meshConfig") {
            let other = keys(root, "meshConfig");
            let skipped = (!other.is_empty()).then(|| Skipped {
                pos: root.pos,
                parent: String::new(),
                keys: other,
            });
            return Some(MeshBlock {
                node: block,
                path: "meshConfig".into(),
                resource: "Helm values".into(),
                skipped,
            });
        }
        Some(MeshBlock {
            node: root,
            path: String::new(),
            resource: "meshConfig".into(),
            skipped: None,
        })
    }

    fn claim_mesh(&mut self, file: &Arc<str>, pos: Pos) -> bool {
        if let Some((f, line)) = &self.mesh_origin {
            let msg = format!(
                "mesh settings are already defined at {f}:{line}; only one MeshConfig is allowed"
            );
            self.error_at(file, pos, msg);
            return false;
        }
        self.mesh_origin = Some((file.clone(), pos.line));
        true
    }

    fn add_document(&mut self, file: &Arc<str>, root: &Node) {
        if !matches!(root.value, yaml::Value::Map(_)) {
            self.error_at(
                file,
                root.pos,
                format!(
                    "expected a Kubernetes resource (a mapping with apiVersion and kind), found {}",
                    root.type_name()
                ),
            );
            return;
        }
        let api_version = root.get("apiVersion").and_then(Node::as_str);
        let kind_name = root.get("kind").and_then(Node::as_str);
        let (Some(api_version), Some(kind_name)) = (api_version, kind_name) else {
            self.error_at(
                file,
                root.pos,
                "resource must have string fields apiVersion and kind".to_string(),
            );
            return;
        };
        if kind_name == "List" && api_version == "v1" {
            let Some(items) = root.get("items") else {
                return;
            };
            match &items.value {
                yaml::Value::Seq(items) => {
                    for item in items {
                        self.add_document(file, item);
                    }
                }
                _ => self.error_at(file, items.pos, "List.items must be a list".to_string()),
            }
            return;
        }
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let kind = Kind::from_name(kind_name).filter(|k| k.api().0 == group);
        let Some(kind) = kind else {
            *self
                .skipped
                .entry(format!("{kind_name} {api_version}"))
                .or_default() += 1;
            if self.first_skipped.is_none() {
                self.first_skipped = Some((file.clone(), root.pos));
            }
            return;
        };
        self.order += 1;
        let order = self.order;
        let mut sink = Sink {
            file: file.clone(),
            resource: None,
            out: &mut self.diags,
        };
        let mut f = Fields::new(&mut sink, root, "");
        f.ignore("apiVersion");
        f.ignore("kind");
        f.ignore("status");
        let meta = decode_meta(&mut sink, f.take("metadata"), root.pos);
        sink.resource = Some(format!("{kind} {}/{}", meta.namespace, meta.name));
        let (_, versions) = kind.api();
        if !versions.contains(&version) {
            sink.error(
                root.pos,
                "apiVersion",
                format!(
                    "{kind} is not served in {api_version} (supported: {})",
                    versions
                        .iter()
                        .map(|v| format!("{group}/{v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
        let spec_node = f.take("spec");
        f.finish(&mut sink);
        let empty = Node {
            pos: root.pos,
            value: yaml::Value::Map(Vec::new()),
        };
        let spec = spec_node.unwrap_or(&empty);
        let origin = Origin {
            file: file.clone(),
            line: root.pos.line,
            order,
        };
        let key = (kind, meta.namespace.clone(), meta.name.clone());
        // `kubectl apply` of both documents leaves the later one in place
        // (it updates the object the earlier one created), so the later
        // replaces the earlier here too. The MeshConfig kind has its own
        // one-only rule (`claim_mesh`).
        let replaced = if kind == Kind::MeshConfig {
            None
        } else {
            self.seen.get(&key).cloned()
        };
        if let Some((f0, l0)) = &replaced {
            sink.warn(
                root.pos,
                "metadata.name",
                format!(
                    "{kind} {}/{} is also defined at {f0}:{l0}; this definition replaces that one, as `kubectl apply` of both would",
                    meta.namespace, meta.name
                ),
            );
        }
        if kind != Kind::AuthorizationPolicy && meta.annotations.contains_key(DRY_RUN_ANNOTATION) {
            sink.error(
                root.pos,
                &format!("metadata.annotations[{DRY_RUN_ANNOTATION}]"),
                format!("{kind} does not support the {DRY_RUN_ANNOTATION} annotation; remove it"),
            );
        }
        match kind {
            Kind::PeerAuthentication => {
                let spec = PeerAuthentication::decode(&mut sink, spec, "spec");
                upsert(
                    &mut self.set.peer_authentications,
                    Resource { meta, origin, spec },
                );
            }
            Kind::AuthorizationPolicy => {
                let spec = AuthorizationPolicy::decode(&mut sink, spec, "spec");
                if let Some(v) = meta.annotations.get(DRY_RUN_ANNOTATION) {
                    if matches!(spec.action, Action::Audit | Action::Custom) {
                        sink.error(root.pos, &format!("metadata.annotations[{DRY_RUN_ANNOTATION}]"), format!("the {DRY_RUN_ANNOTATION} annotation only supports ALLOW and DENY policies, found {}", spec.action));
                    } else if parse_go_bool(v).is_none() {
                        sink.error(
                            root.pos,
                            &format!("metadata.annotations[{DRY_RUN_ANNOTATION}]"),
                            format!("\"{v}\" is not a boolean (expected \"true\" or \"false\")"),
                        );
                    }
                }
                upsert(
                    &mut self.set.authorization_policies,
                    Resource { meta, origin, spec },
                );
            }
            Kind::RequestAuthentication => {
                let spec = RequestAuthentication::decode(&mut sink, spec, "spec");
                upsert(
                    &mut self.set.request_authentications,
                    Resource { meta, origin, spec },
                );
            }
            Kind::DestinationRule => {
                let spec = DestinationRule::decode(&mut sink, spec, "spec");
                upsert(
                    &mut self.set.destination_rules,
                    Resource { meta, origin, spec },
                );
            }
            Kind::ServiceEntry => {
                let spec = ServiceEntry::decode(&mut sink, spec, "spec");
                upsert(
                    &mut self.set.service_entries,
                    Resource { meta, origin, spec },
                );
            }
            Kind::WorkloadEntry => {
                let spec = WorkloadEntry::decode(&mut sink, spec, "spec");
                upsert(
                    &mut self.set.workload_entries,
                    Resource { meta, origin, spec },
                );
            }
            Kind::MeshConfig => {
                let mesh = MeshConfig::decode(&mut sink, spec, "spec");
                if self.claim_mesh(file, root.pos) {
                    self.set.mesh = mesh;
                }
            }
        }
        self.seen.insert(key, (file.clone(), root.pos.line));
    }

    /// Cross-resource checks, then the all-or-nothing verdict.
    pub fn finish(mut self) -> Result<Loaded, Diagnostics> {
        if !self.skipped.is_empty() {
            let (file, pos) = self
                .first_skipped
                .clone()
                .unwrap_or((Arc::from("<input>"), Pos::default()));
            let total: usize = self.skipped.values().sum();
            let list: Vec<String> = self
                .skipped
                .iter()
                .map(|(k, n)| format!("{k} ({n})"))
                .collect();
            self.diags.push(Diagnostic {
                severity: Severity::Warning,
                file,
                pos,
                resource: None,
                field: None,
                message: format!(
                    "skipped {total} resource(s) of kinds meshward does not act on: {}",
                    list.join(", ")
                ),
            });
        }
        self.cross_checks();
        // Report in reading order: files as first seen, lines ascending.
        let mut files: Vec<Arc<str>> = Vec::new();
        for d in &self.diags {
            if !files.contains(&d.file) {
                files.push(d.file.clone());
            }
        }
        self.diags
            .sort_by_key(|d| (files.iter().position(|f| *f == d.file), d.pos.line));
        let diags = Diagnostics(self.diags);
        if diags.has_errors() {
            Err(diags)
        } else {
            Ok(Loaded {
                config: self.set,
                warnings: diags,
                documents: self.documents,
            })
        }
    }

    fn cross_checks(&mut self) {
        let root_ns = self.set.mesh.root_namespace.clone();
        let ra_namespaces: BTreeSet<&str> = self
            .set
            .request_authentications
            .iter()
            .map(|r| r.meta.namespace.as_str())
            .collect();
        let mut warnings = Vec::new();
        for p in &self.set.authorization_policies {
            let warn = |msg: String, field: &str| Diagnostic {
                severity: Severity::Warning,
                file: p.origin.file.clone(),
                pos: Pos {
                    line: p.origin.line,
                    col: 1,
                },
                resource: Some(format!("AuthorizationPolicy {}", p.key())),
                field: Some(field.to_string()),
                message: msg,
            };
            if p.spec.uses_jwt()
                && !ra_namespaces.contains(p.meta.namespace.as_str())
                && !ra_namespaces.contains(root_ns.as_str())
            {
                warnings.push(warn(
                    format!("uses requestPrincipals or request.auth.* but no RequestAuthentication exists in namespace \"{}\" or \"{root_ns}\"; these conditions can never be satisfied", p.meta.namespace),
                    "spec.rules",
                ));
            }
            if p.spec.action == Action::Custom
                && let Some(name) = p.spec.provider.as_deref().filter(|n| !n.is_empty())
            {
                match self.set.mesh.provider(name) {
                        None if self.set.mesh.invalid_providers.contains_key(name) => warnings.push(warn(
                            format!("extension provider \"{name}\" has errors (see the mesh config warnings); requests to the selected workloads will be denied"),
                            "spec.provider.name",
                        )),
                        None => warnings.push(warn(
                            format!("extension provider \"{name}\" is not defined in the mesh config; the requests and connections this policy's rules match will be denied"),
                            "spec.provider.name",
                        )),
                        Some(prov) if !prov.is_authz() => warnings.push(warn(
                            format!("extension provider \"{name}\" is a {} provider, not an authorization provider; the requests and connections this policy's rules match will be denied", prov.kind),
                            "spec.provider.name",
                        )),
                        Some(_) => {}
                    }
            }
            if p.spec
                .selector
                .as_ref()
                .is_some_and(|s| s.match_labels.is_empty())
            {
                warnings.push(warn(
                    "selector has no labels and selects every workload in the namespace"
                        .to_string(),
                    "spec.selector",
                ));
            }
        }
        for we in &self.set.workload_entries {
            let providers: std::collections::BTreeSet<&str> = self
                .set
                .authorization_policies
                .iter()
                .filter(|p| {
                    p.spec.action == Action::Custom
                        && p.spec.target_refs.is_empty()
                        && (p.meta.namespace == we.meta.namespace || p.meta.namespace == root_ns)
                        && p.spec
                            .selector
                            .as_ref()
                            .is_none_or(|s| s.matches(&we.spec.labels))
                })
                .map(|p| p.spec.provider.as_deref().unwrap_or_default())
                .collect();
            if providers.len() > 1 {
                let names: Vec<String> = providers.iter().map(|n| format!("\"{n}\"")).collect();
                warnings.push(Diagnostic {
                    severity: Severity::Warning,
                    file: we.origin.file.clone(),
                    pos: Pos {
                        line: we.origin.line,
                        col: 1,
                    },
                    resource: Some(format!("WorkloadEntry {}", we.key())),
                    field: None,
                    message: format!(
                        "the CUSTOM policies that select this workload name {}; only one provider can be used per workload, so the requests and connections their rules match will be denied",
                        names.join(", ")
                    ),
                });
            }
        }
        self.diags.extend(warnings);
    }
}

/// The `meshConfig` block of a mesh settings file.
struct MeshBlock<'n> {
    node: &'n Node,
    /// Its field path in the file (`spec.meshConfig`, `meshConfig`, or
    /// empty for a bare block).
    path: String,
    /// How diagnostics name the file's content.
    resource: String,
    /// Sibling keys meshward does not read.
    skipped: Option<Skipped>,
}

struct Skipped {
    pos: Pos,
    /// The mapping they are in (`spec`, or empty for the top level).
    parent: String,
    keys: Vec<String>,
}

/// Adds a resource, or replaces the one of the same namespace and name.
/// The replacement takes the place, load order and creation timestamp of
/// the one it replaces: an object updated by `kubectl apply` keeps its
/// creation time, which is what breaks ties between policies (see
/// [`Resource::is_older_than`]).
fn upsert<T>(list: &mut Vec<Resource<T>>, mut r: Resource<T>) {
    match list
        .iter_mut()
        .find(|o| o.meta.namespace == r.meta.namespace && o.meta.name == r.meta.name)
    {
        Some(old) => {
            r.origin.order = old.origin.order;
            r.meta.creation_timestamp = old.meta.creation_timestamp.take();
            *old = r;
        }
        None => list.push(r),
    }
}

/// The annotation that makes an AuthorizationPolicy evaluate without enforcing.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// Go's `strconv.ParseBool`, which Istio uses for the dry-run annotation.
pub fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

const IGNORED_META: &[&str] = &[
    "uid",
    "resourceVersion",
    "generation",
    "managedFields",
    "ownerReferences",
    "finalizers",
    "generateName",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
];

fn decode_meta(sink: &mut Sink<'_>, node: Option<&Node>, pos: Pos) -> ObjectMeta {
    let Some(node) = node else {
        sink.error(pos, "metadata", "missing required field \"metadata\"");
        return ObjectMeta {
            namespace: "default".into(),
            ..ObjectMeta::default()
        };
    };
    let mut f = Fields::new(sink, node, "metadata");
    let name = f
        .require(sink, "name")
        .and_then(|n| decode::string(sink, n, "metadata.name"))
        .unwrap_or_default();
    if let Err(e) = check_name(&name) {
        sink.error(node.pos, "metadata.name", e);
    }
    let namespace = f
        .string(sink, "namespace")
        .unwrap_or_else(|| "default".to_string());
    if let Err(e) = check_namespace(&namespace) {
        sink.error(node.pos, "metadata.namespace", e);
    }
    let labels = f.string_map(sink, "labels");
    let annotations = f.string_map(sink, "annotations");
    let creation_timestamp = f.string(sink, "creationTimestamp");
    for key in IGNORED_META {
        f.ignore(key);
    }
    f.finish(sink);
    ObjectMeta {
        name,
        namespace,
        labels,
        annotations,
        creation_timestamp,
    }
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>, top: bool) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        entries.sort();
        for entry in entries {
            let hidden = entry
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if !hidden {
                collect_files(&entry, out, false)?;
            }
        }
    } else if top || is_config_file(path) {
        out.push(path.to_path_buf());
    }
    Ok(())
}

fn is_config_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// A configuration file that held documents at the last load and holds
/// none now, or a configuration directory that held some and has none in
/// any file ([`emptied`]). A writer that truncates, then writes, leaves
/// such a file for a moment, and applying it would drop its policies; so
/// a watcher holds the change back until the file has content again or
/// is deleted (which removes its resources).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{} is empty but held {documents} document(s) at the last load; taken for {} being written, the change waits until it has content again{}",
    path.display(),
    if *directory { "a directory" } else { "a file" },
    if *directory { "" } else { " or is deleted (deleting it removes its resources)" }
)]
pub struct Emptied {
    /// The file or directory.
    pub path: PathBuf,
    /// How many documents it held at the last load.
    pub documents: usize,
    /// Whether `path` is one of the configuration directories.
    pub directory: bool,
}

/// Whether a load must wait ([`Emptied`]): `before` and `now` are the
/// documents per source of the last applied load and of this one
/// ([`Loaded::documents`]), `config_paths` the paths the configuration is
/// read from. A file absent from `now` was deleted, which is applied.
pub fn emptied(
    before: &BTreeMap<String, usize>,
    now: &BTreeMap<String, usize>,
    config_paths: &[PathBuf],
) -> Option<Emptied> {
    for (file, &n) in now {
        let had = before.get(file).copied().unwrap_or(0);
        if n == 0 && had > 0 {
            return Some(Emptied {
                path: PathBuf::from(file),
                documents: had,
                directory: false,
            });
        }
    }
    let under = |counts: &BTreeMap<String, usize>, dir: &Path| -> usize {
        counts
            .iter()
            .filter(|(f, _)| Path::new(f.as_str()).starts_with(dir))
            .map(|(_, n)| n)
            .sum()
    };
    for dir in config_paths.iter().filter(|p| p.is_dir()) {
        let had = under(before, dir);
        if had > 0 && under(now, dir) == 0 {
            return Some(Emptied {
                path: dir.clone(),
                documents: had,
                directory: true,
            });
        }
    }
    None
}
