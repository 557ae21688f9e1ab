//! Reloads configuration and certificates when their files change: the
//! configuration, the workload's certificates, and the files
//! DestinationRules name (`caCertificates`, `clientCertificate`,
//! `privateKey`). A change that does not load is refused (logged,
//! counted) and the proxy keeps serving with what it had.
//!
//! One mechanism decides whether anything changed: a fingerprint of the
//! files each loader reads ([`scan`]), compared with the one last acted
//! on. It is taken when file events say something happened (after they
//! have been quiet for [`QUIET`]) and every [`RESCAN`] regardless. Events
//! (inotify, through `notify`) only make changes apply sooner: they are
//! lost when a watched directory is deleted and re-created, when its
//! parent is replaced, when a watched inode is swapped away (a Kubernetes
//! volume's `..data` link), when inotify's queue overflows or its limits
//! are reached. The periodic scan sees every one of those, and when a
//! watched path's inode changes the watches are set up again, so events
//! flow again after the first change. (Envoy and Istio's agent watch the
//! parent directory and compare contents on each event, but never look
//! again once the watched directory itself is gone; meshward adds the
//! scan for that.)
//!
//! A source whose path is missing or cannot be listed is *lost*: the proxy
//! keeps its last good state (a vanished directory is not an empty
//! configuration), logs one WARN, sets `meshward_config_source_up` to 0,
//! shows it in `/config_dump`, and keeps looking. It stays ready.

pub mod scan;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher as _};
pub use scan::{Scan, Scanner};

use crate::listeners::Listeners;
use crate::source::{Source, SourceState};
use crate::state::{LoadError, State};

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

/// Keeps the reload thread running; dropping it stops the thread.
pub struct Watcher {
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
    /// state was loaded, so a change made while it loaded is seen. A file
    /// watch that cannot be set up is logged and left to the scan; it does
    /// not stop the proxy.
    pub fn start(
        state: Arc<State>,
        listeners: Arc<Listeners>,
        scanner: Scanner,
        first: Scan,
    ) -> Result<Watcher, String> {
        let (tx, rx) = mpsc::channel();
        let mut reloader = Reloader {
            state,
            listeners,
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

/// A directory watched, and the inode it was when the watch was set up.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Watch {
    dir: PathBuf,
    recursive: bool,
    id: Option<(u64, u64)>,
}

/// The reload thread's state.
struct Reloader {
    state: Arc<State>,
    listeners: Arc<Listeners>,
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
        let state = Arc::clone(&self.state);
        let bootstrap = &state.bootstrap;
        let mut scan = self.scanner.scan(bootstrap);
        if scan != self.applied {
            for _ in 0..SETTLE_SCANS {
                if !self.pause(QUIET) {
                    return false;
                }
                let again = self.scanner.scan(bootstrap);
                let settled = again == scan;
                scan = again;
                if settled {
                    break;
                }
            }
            self.apply(scan);
        }
        // Only files whose contents changed are loaded again.
        self.state.reload_dr_files();
        self.rewatch();
        true
    }

    /// Acts on what changed since the last scan acted on.
    fn apply(&mut self, scan: Scan) {
        let state = &*self.state;
        if scan.config != self.applied.config {
            match &scan.config {
                scan::Fingerprint::Lost(why) => self.lost(Source::Config, why),
                scan::Fingerprint::Files(_) => match state.reload_config() {
                    Ok(v) => {
                        let before = state
                            .sources
                            .loaded(Source::Config, Some(v), &state.metrics);
                        if before == SourceState::Lost {
                            tracing::info!(target: "meshward::config", source = "config", "configuration source back");
                        }
                        tracing::info!(target: "meshward::config", version = v, "configuration reloaded");
                        // Bind errors are logged there and do not undo the change.
                        self.listeners.reconcile();
                    }
                    Err(e @ LoadError::Held { .. }) => {
                        state.sources.set(
                            Source::Config,
                            SourceState::Held,
                            e.to_string(),
                            &state.metrics,
                        );
                        tracing::warn!(target: "meshward::config", source = "config", error = %e, "configuration change held; keeping the previous configuration");
                    }
                    Err(e) => {
                        state.metrics.config_rejected();
                        state.sources.set(
                            Source::Config,
                            SourceState::Refused,
                            e.to_string(),
                            &state.metrics,
                        );
                        tracing::error!(target: "meshward::config", error = %e, "configuration change refused; keeping the previous configuration");
                    }
                },
            }
        }
        if scan.certs != self.applied.certs {
            match &scan.certs {
                scan::Fingerprint::Lost(why) => self.lost(Source::Certs, why),
                scan::Fingerprint::Files(_) => match state.reload_certs() {
                    Ok(()) => {
                        let before = state.sources.loaded(Source::Certs, None, &state.metrics);
                        if before == SourceState::Lost {
                            tracing::info!(target: "meshward::certs", source = "certs", "certificate source back");
                        }
                        tracing::info!(target: "meshward::certs", identity = %state.tls().credentials.id(), "certificates reloaded");
                    }
                    Err(e) => {
                        state.metrics.config_rejected();
                        state.sources.set(
                            Source::Certs,
                            SourceState::Refused,
                            e.to_string(),
                            &state.metrics,
                        );
                        tracing::error!(target: "meshward::certs", error = %e, "certificate change refused; keeping the previous certificates");
                    }
                },
            }
        }
        self.applied = scan;
    }

    /// Records that `source` cannot be read; logs once when it becomes so.
    fn lost(&self, source: Source, why: &str) {
        let state = &*self.state;
        let before = state
            .sources
            .set(source, SourceState::Lost, why.to_string(), &state.metrics);
        if before == SourceState::Lost {
            return;
        }
        let every = RESCAN.as_secs();
        match source {
            Source::Config => tracing::warn!(
                target: "meshward::config",
                source = "config",
                error = %why,
                version = state.snapshot().version,
                "configuration source lost; keeping the last good configuration and looking again every {every}s"
            ),
            Source::Certs => tracing::warn!(
                target: "meshward::certs",
                source = "certs",
                error = %why,
                identity = %state.tls().credentials.id(),
                "certificate source lost; keeping the certificates in use and looking again every {every}s"
            ),
        }
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
        let b = &self.state.bootstrap;
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
        flat.extend(self.state.dr_files.dirs());
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
