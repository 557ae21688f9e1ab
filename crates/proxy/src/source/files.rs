//! The file source: configuration from files and directories of mesh
//! resources (and a mesh config file), credentials from the workload's
//! certificate directory (`key.pem`, `cert-chain.pem`, `root-cert.pem`),
//! and the files DestinationRules name. It loads them once at start (a
//! failure stops the proxy from starting) and then, when watched,
//! publishes each change: a change that does not load is published as
//! refused, and the proxy keeps serving with what it had.
//!
//! One mechanism decides whether anything changed: a fingerprint of the
//! files each loader reads (`scan.rs`), compared with the one
//! last acted on. It is taken when file events say something happened
//! (after they have been quiet for [`QUIET`]) and every [`RESCAN`]
//! regardless. Events (inotify, through `notify`) only make changes apply
//! sooner: they are lost when a watched directory is deleted and
//! re-created, when its parent is replaced, when a watched inode is swapped
//! away (a Kubernetes volume's `..data` link), when inotify's queue
//! overflows or its limits are reached. The periodic scan sees every one of
//! those, and when a watched path's inode changes the watches are set up
//! again, so events flow again after the first change. (Envoy and Istio's
//! agent watch the parent directory and compare contents on each event,
//! but never look again once the watched directory itself is gone;
//! meshward adds the scan for that.)
//!
//! A source whose path is missing or cannot be listed is published *lost*:
//! the proxy keeps its last good state (a vanished directory is not an
//! empty configuration). A configuration file that held documents and is
//! empty now is published *held* (taken for a file being written).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use meshward_config::{ConfigSet, Loaded, Loader};
use meshward_identity::{TrustBundle, WorkloadCredentials};
use notify::{RecursiveMode, Watcher as _};

use super::scan::{self, Scan, Scanner};
use super::{
    ConfigUpdate, Credentials, Feed, LocalFiles, Publisher, Source, SourceInfo, SourceState,
};

/// How often the files are looked at when no event says they changed.
pub const RESCAN: Duration = Duration::from_secs(2);

/// Changes are looked at once the file events have been quiet this long,
/// so a writer's several steps (or a rotation's key and certificate)
/// apply as one.
pub const QUIET: Duration = Duration::from_millis(200);

/// The longest a stream of events delays a look at the files.
const MAX_GATHER: Duration = Duration::from_secs(2);

/// A change is applied once two scans [`QUIET`] apart agree (at most this
/// many scans: a file written without pause is then taken as it is).
const SETTLE_SCANS: usize = 10;

/// Why the file source could not load its files (at start: the proxy
/// does not start) or publishes a change as refused or held.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    #[error("invalid configuration:\n{0}")]
    Config(meshward_config::Diagnostics),
    #[error("certificates: {0}")]
    Credentials(#[from] meshward_identity::CredentialsFileError),
    #[error("trust bundle: {0}")]
    Bundle(#[from] meshward_identity::bundle::BundleError),
    /// A configuration file (or directory) that held documents at the
    /// last load holds none now: the change waits (see
    /// [`meshward_config::Emptied`]).
    #[error(transparent)]
    Held(#[from] meshward_config::Emptied),
    #[error("cannot start the reload thread: {0}")]
    Watch(String),
}

/// Where the file source reads.
#[derive(Debug, Clone)]
pub struct FilePaths {
    /// Files or directories of mesh resources.
    pub config_paths: Vec<PathBuf>,
    pub mesh_config: Option<PathBuf>,
    /// `key.pem`, `cert-chain.pem`, `root-cert.pem`.
    pub certs_dir: PathBuf,
}

/// Loads the files once and, with `watch`, starts the thread that
/// publishes their changes. Fails when the first load does.
pub fn start(paths: FilePaths, watch: bool) -> Result<Feed, FileError> {
    let info = SourceInfo {
        kind: "files",
        config: paths
            .config_paths
            .iter()
            .chain(paths.mesh_config.iter())
            .map(|p| p.display().to_string())
            .collect(),
        credentials: vec![paths.certs_dir.display().to_string()],
        watched: watch,
        rescan: watch.then_some(RESCAN),
    };
    let (publisher, feed) = Publisher::new(info);
    // What the files hold before they are loaded: a change made while
    // they load is then seen by the first look.
    let mut scanner = Scanner::default();
    let first = watch.then(|| scanner.scan(&paths));
    let loaded = load_config(&paths)?;
    let credentials = load_credentials(&paths.certs_dir)?;
    let mut files = Files {
        paths,
        publisher,
        documents: BTreeMap::new(),
        named: BTreeSet::new(),
    };
    files.publish_config(loaded);
    files.publisher.credentials(credentials);
    let Some(first) = first else {
        return Ok(feed);
    };
    let watcher = Watcher::start(files, scanner, first).map_err(FileError::Watch)?;
    Ok(feed.with_guard(watcher))
}

/// Keeps the reload thread running; dropping it stops the thread.
struct Watcher {
    stop: mpsc::Sender<Msg>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher").finish_non_exhaustive()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.stop.send(Msg::Stop);
    }
}

enum Msg {
    Event(notify::Result<notify::Event>),
    Stop,
}

impl Watcher {
    /// Starts the reload thread. `first` is the scan taken before the
    /// files were loaded, so a change made while they loaded is seen. A
    /// file watch that cannot be set up is logged and left to the scan; it
    /// does not stop the proxy.
    fn start(files: Files, scanner: Scanner, first: Scan) -> Result<Watcher, String> {
        let (tx, rx) = mpsc::channel();
        let mut reloader = Reloader {
            files,
            scanner,
            applied: first,
            rx,
            tx: tx.clone(),
            notify: None,
            watching: Vec::new(),
            watch_problems: BTreeSet::new(),
            event_error_logged: false,
        };
        reloader.rewatch();
        std::thread::Builder::new()
            .name("meshward-reload".to_string())
            .spawn(move || reloader.run())
            .map_err(|e| e.to_string())?;
        Ok(Watcher { stop: tx })
    }
}

/// What the file source publishes, and what it remembers of it.
struct Files {
    paths: FilePaths,
    publisher: Publisher,
    /// How many documents each configuration file held at the last
    /// published load, to tell an emptied file.
    documents: BTreeMap<String, usize>,
    /// The files the last published configuration's DestinationRules name.
    named: BTreeSet<String>,
}

impl Files {
    /// Publishes a loaded configuration, the files it names first (so
    /// that its DestinationRules find them).
    fn publish_config(&mut self, mut loaded: Loaded) {
        self.named = named_files(&loaded.config);
        self.publish_named_files();
        self.documents = std::mem::take(&mut loaded.documents);
        self.publisher.config(ConfigUpdate::from(loaded));
    }

    /// Reads the files DestinationRules name; published when their
    /// contents changed.
    fn publish_named_files(&self) {
        let files: LocalFiles = self
            .named
            .iter()
            .map(|p| {
                let read = std::fs::read(p).map(Arc::from).map_err(|e| e.to_string());
                (p.clone(), read)
            })
            .collect();
        self.publisher.files(files);
    }
}

/// A directory watched, and the inode it was when the watch was set up.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Watch {
    dir: PathBuf,
    recursive: bool,
    id: Option<(u64, u64)>,
}

/// The reload thread's state.
struct Reloader {
    files: Files,
    scanner: Scanner,
    /// The scan last acted on (applied, refused, held or lost).
    applied: Scan,
    rx: mpsc::Receiver<Msg>,
    /// For the file watchers, which are replaced when their paths are.
    tx: mpsc::Sender<Msg>,
    notify: Option<notify::RecommendedWatcher>,
    watching: Vec<Watch>,
    /// Watches that could not be set up, logged once each.
    watch_problems: BTreeSet<String>,
    event_error_logged: bool,
}

impl Reloader {
    fn run(mut self) {
        let mut next_scan = Instant::now() + RESCAN;
        loop {
            let wait = next_scan.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(wait) {
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Ok(Msg::Event(e)) => {
                    if !self.is_hint(e) {
                        continue;
                    }
                    if !self.gather() {
                        return;
                    }
                    tracing::debug!(target: "meshward::config", "file events; looking at the files");
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if !self.check() {
                return;
            }
            next_scan = Instant::now() + RESCAN;
        }
    }

    /// Whether an event may mean a change. Reads (the proxy's own
    /// included) are not; an error of the watcher (a queue overflow, say)
    /// may hide one.
    fn is_hint(&mut self, event: notify::Result<notify::Event>) -> bool {
        use notify::EventKind;
        use notify::event::{AccessKind, AccessMode};
        match event {
            Ok(e) => match e.kind {
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
                EventKind::Access(_) => false,
                _ => true,
            },
            Err(e) => {
                if !self.event_error_logged {
                    self.event_error_logged = true;
                    tracing::warn!(target: "meshward::config", error = %e, "file watch error; changes are still found by looking at the files every {}s", RESCAN.as_secs());
                }
                true
            }
        }
    }

    /// Waits until events have been quiet for [`QUIET`] (at most
    /// [`MAX_GATHER`]); false when the thread must stop.
    fn gather(&mut self) -> bool {
        let start = Instant::now();
        let mut quiet_until = start + QUIET;
        loop {
            let now = Instant::now();
            if now >= quiet_until || now >= start + MAX_GATHER {
                return true;
            }
            match self.rx.recv_timeout(quiet_until - now) {
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return false,
                Ok(Msg::Event(e)) => {
                    if self.is_hint(e) {
                        quiet_until = Instant::now() + QUIET;
                    }
                }
                Err(RecvTimeoutError::Timeout) => return true,
            }
        }
    }

    /// Sleeps for `d`, taking (and dropping) events meanwhile: the next
    /// scan sees what they announce. False when the thread must stop.
    fn pause(&mut self, d: Duration) -> bool {
        let until = Instant::now() + d;
        loop {
            let now = Instant::now();
            if now >= until {
                return true;
            }
            match self.rx.recv_timeout(until - now) {
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return false,
                Ok(Msg::Event(e)) => {
                    self.is_hint(e);
                }
                Err(RecvTimeoutError::Timeout) => return true,
            }
        }
    }

    /// Looks at the files; applies what changed once it has settled; then
    /// re-reads the DestinationRule files and brings the watches in line.
    /// False when the thread must stop.
    fn check(&mut self) -> bool {
        if self.files.publisher.is_closed() {
            return false;
        }
        let mut scan = self.scanner.scan(&self.files.paths);
        if scan != self.applied {
            for _ in 0..SETTLE_SCANS {
                if !self.pause(QUIET) {
                    return false;
                }
                let again = self.scanner.scan(&self.files.paths);
                let settled = again == scan;
                scan = again;
                if settled {
                    break;
                }
            }
            self.apply(scan);
        }
        // Published only when their contents changed.
        self.files.publish_named_files();
        self.rewatch();
        true
    }

    /// Publishes what changed since the last scan acted on.
    fn apply(&mut self, scan: Scan) {
        let files = &mut self.files;
        if scan.config != self.applied.config {
            match &scan.config {
                scan::Fingerprint::Lost(why) => {
                    files
                        .publisher
                        .problem(Source::Config, SourceState::Lost, why.clone());
                }
                scan::Fingerprint::Files(_) => match load_config(&files.paths) {
                    Ok(loaded) => {
                        match meshward_config::emptied(
                            &files.documents,
                            &loaded.documents,
                            &files.paths.config_paths,
                        ) {
                            Some(held) => files.publisher.problem(
                                Source::Config,
                                SourceState::Held,
                                FileError::Held(held).to_string(),
                            ),
                            None => files.publish_config(loaded),
                        }
                    }
                    Err(e) => {
                        files.publisher.problem(
                            Source::Config,
                            SourceState::Refused,
                            e.to_string(),
                        );
                    }
                },
            }
        }
        if scan.certs != self.applied.certs {
            match &scan.certs {
                scan::Fingerprint::Lost(why) => {
                    files
                        .publisher
                        .problem(Source::Certs, SourceState::Lost, why.clone());
                }
                scan::Fingerprint::Files(_) => match load_credentials(&files.paths.certs_dir) {
                    Ok(c) => files.publisher.credentials(c),
                    Err(e) => {
                        files
                            .publisher
                            .problem(Source::Certs, SourceState::Refused, e.to_string());
                    }
                },
            }
        }
        self.applied = scan;
    }

    /// Watches what should be watched now: each configuration directory
    /// and the certificate directory (recursively), the directory of each
    /// configuration file and of each file a DestinationRule names (so
    /// that a file replaced by a rename or a link swap is seen). When any
    /// of them is not the inode it was (re-created, replaced, a link
    /// swapped), or the set changed, the watcher is made anew: a fresh
    /// inotify instance, so no stale watch of the old inodes remains.
    fn rewatch(&mut self) {
        let wanted = self.wanted();
        if self.notify.is_some() && wanted == self.watching {
            return;
        }
        self.notify = None;
        self.event_error_logged = false;
        let tx = self.tx.clone();
        let mut problems = BTreeSet::new();
        match notify::recommended_watcher(move |e| {
            let _ = tx.send(Msg::Event(e));
        }) {
            Ok(mut w) => {
                for x in &wanted {
                    let mode = if x.recursive {
                        RecursiveMode::Recursive
                    } else {
                        RecursiveMode::NonRecursive
                    };
                    if let Err(e) = w.watch(&x.dir, mode) {
                        problems.insert(format!("{}: {e}", x.dir.display()));
                    }
                }
                self.notify = Some(w);
            }
            Err(e) => {
                problems.insert(e.to_string());
            }
        }
        for p in problems.difference(&self.watch_problems) {
            tracing::warn!(target: "meshward::config", error = %p, "cannot watch files; their changes are found by looking at them every {}s", RESCAN.as_secs());
        }
        self.watch_problems = problems;
        self.watching = wanted;
    }

    fn wanted(&self) -> Vec<Watch> {
        let b = &self.files.paths;
        let mut recursive = Vec::new();
        let mut flat = Vec::new();
        for p in &b.config_paths {
            match std::fs::metadata(p) {
                Ok(m) if m.is_dir() => recursive.extend(canonical(p)),
                Ok(_) => flat.extend(canonical(&parent(p))),
                Err(_) => {}
            }
        }
        if let Some(mc) = &b.mesh_config {
            flat.extend(canonical(&parent(mc)));
        }
        recursive.extend(canonical(&b.certs_dir));
        flat.extend(
            self.files
                .named
                .iter()
                .map(|p| parent(Path::new(p)))
                .filter_map(|d| canonical(&d)),
        );
        // Inotify has one watch per directory: a directory under a
        // recursive watch is not watched again.
        recursive.sort();
        recursive.dedup();
        let nested: Vec<PathBuf> = recursive
            .iter()
            .filter(|r| recursive.iter().any(|o| o != *r && r.starts_with(o)))
            .cloned()
            .collect();
        recursive.retain(|r| !nested.contains(r));
        flat.retain(|d| !recursive.iter().any(|r| d.starts_with(r)));
        flat.sort();
        flat.dedup();
        let watch = |dir: PathBuf, recursive: bool| Watch {
            id: identity(&dir),
            dir,
            recursive,
        };
        recursive
            .into_iter()
            .map(|d| watch(d, true))
            .chain(flat.into_iter().map(|d| watch(d, false)))
            .collect()
    }
}

fn parent(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn canonical(p: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(p).ok()
}

/// The device and inode of `p`.
fn identity(p: &Path) -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = p;
        None
    }
}

fn load_config(b: &FilePaths) -> Result<Loaded, FileError> {
    let mut loader = Loader::new();
    if let Some(mc) = &b.mesh_config {
        loader.add_mesh_config_path(mc);
    }
    for p in &b.config_paths {
        loader.add_path(p);
    }
    loader.finish().map_err(FileError::Config)
}

fn load_credentials(dir: &Path) -> Result<Credentials, FileError> {
    Ok(Credentials {
        credentials: WorkloadCredentials::from_dir(dir)?,
        bundle: TrustBundle::from_pem_file(&dir.join("root-cert.pem"))?,
    })
}

/// The files the DestinationRules of `config` name for SIMPLE or MUTUAL
/// TLS (`caCertificates`; `clientCertificate` and `privateKey`).
fn named_files(config: &ConfigSet) -> BTreeSet<String> {
    use meshward_config::model::networking::{ClientTls, TlsMode, TrafficPolicy};
    fn of_tls(tls: &ClientTls, out: &mut BTreeSet<String>) {
        if matches!(tls.mode, TlsMode::Simple | TlsMode::Mutual) {
            out.extend(tls.ca_certificates.iter().cloned());
        }
        if tls.mode == TlsMode::Mutual {
            out.extend(tls.client_certificate.iter().cloned());
            out.extend(tls.private_key.iter().cloned());
        }
    }
    fn of_policy(tp: &TrafficPolicy, out: &mut BTreeSet<String>) {
        for tls in tp
            .tls
            .iter()
            .chain(tp.port_level_settings.iter().filter_map(|p| p.tls.as_ref()))
        {
            of_tls(tls, out);
        }
    }
    let mut out = BTreeSet::new();
    for dr in &config.destination_rules {
        for tp in dr.spec.traffic_policy.iter().chain(
            dr.spec
                .subsets
                .iter()
                .filter_map(|s| s.traffic_policy.as_ref()),
        ) {
            of_policy(tp, &mut out);
        }
    }
    out
}
