//! Reloads configuration and certificates when their files change: the
//! configuration, the workload's certificates, and the files
//! DestinationRules name (`caCertificates`, `clientCertificate`,
//! `privateKey`; their directories are watched, and follow the
//! configuration). A change that does not load is refused (logged,
//! counted) and the proxy keeps serving with what it had.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use notify::{RecursiveMode, Watcher as _};

use crate::listeners::Listeners;
use crate::state::State;

/// Changes are applied once the files have been quiet this long, so a
/// writer's several steps (or a rotation's key and certificate) apply as
/// one.
const QUIET: Duration = Duration::from_millis(200);

/// Keeps the file watches alive; dropping it stops the reload thread
/// (which holds it only weakly, to change the DestinationRule watches).
pub struct Watcher {
    _watcher: Arc<Mutex<notify::RecommendedWatcher>>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher").finish_non_exhaustive()
    }
}

impl Watcher {
    /// Watches the configuration and certificate paths. A thread waits for
    /// change events (it never wakes while nothing changes: an idle proxy
    /// does no periodic work), gathers them until the files are quiet, then
    /// reloads what changed.
    pub fn start(state: Arc<State>, listeners: Arc<Listeners>) -> Result<Watcher, String> {
        let (tx, rx) = mpsc::channel::<notify::Result<notify::Event>>();
        let mut watcher = notify::recommended_watcher(tx).map_err(|e| e.to_string())?;
        let b = &state.bootstrap;
        for p in b
            .config_paths
            .iter()
            .chain(b.mesh_config.iter())
            .chain(std::iter::once(&b.certs_dir))
        {
            watcher
                .watch(p, RecursiveMode::Recursive)
                .map_err(|e| format!("{}: {e}", p.display()))?;
        }
        let certs_dir = canonical(&b.certs_dir);
        let config_roots: Vec<PathBuf> = b
            .config_paths
            .iter()
            .chain(b.mesh_config.iter())
            .map(|p| canonical(p))
            .collect();
        let roots = Roots {
            certs: certs_dir,
            config: config_roots,
        };
        let watcher = Arc::new(Mutex::new(watcher));
        let mut dr = DrWatches {
            watcher: Arc::downgrade(&watcher),
            dirs: BTreeSet::new(),
            watched: BTreeSet::new(),
        };
        dr.follow(&state, &roots);
        std::thread::Builder::new()
            .name("meshward-reload".to_string())
            .spawn(move || {
                // Ends when the watcher, and with it the sender, is dropped.
                while let Ok(first) = rx.recv() {
                    let mut paths = changed_paths(first);
                    if paths.is_empty() {
                        continue;
                    }
                    loop {
                        match rx.recv_timeout(QUIET) {
                            Ok(event) => paths.extend(changed_paths(event)),
                            Err(RecvTimeoutError::Timeout) => break,
                            Err(RecvTimeoutError::Disconnected) => return,
                        }
                    }
                    reload(&state, &listeners, &roots, &mut dr, &paths);
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(Watcher { _watcher: watcher })
    }
}

/// Where the configuration and the workload's certificates live
/// (canonical paths); both are watched recursively from the start.
struct Roots {
    certs: PathBuf,
    config: Vec<PathBuf>,
}

impl Roots {
    fn cover(&self, dir: &Path) -> bool {
        dir.starts_with(&self.certs) || self.config.iter().any(|r| dir.starts_with(r))
    }
}

/// The directories of the files DestinationRules name.
struct DrWatches {
    watcher: Weak<Mutex<notify::RecommendedWatcher>>,
    /// All of them (canonical paths).
    dirs: BTreeSet<PathBuf>,
    /// Those watched here: the others are under a recursive watch
    /// already, which a second watch of the same directory would disturb
    /// (inotify has one watch per directory, and unwatching it here would
    /// end the recursive one's too).
    watched: BTreeSet<PathBuf>,
}

impl DrWatches {
    /// Watches the directories of the files the current DestinationRules
    /// name, and no others. A directory that does not exist cannot be
    /// watched: its files are tried again when a request needs them
    /// (`dr_tls::RETRY_UNUSABLE`) and at the next configuration change.
    fn follow(&mut self, state: &State, roots: &Roots) {
        let Some(watcher) = self.watcher.upgrade() else {
            return;
        };
        let mut watcher = watcher.lock().unwrap_or_else(|e| e.into_inner());
        self.dirs = state.dr_files.dirs();
        let wanted: BTreeSet<PathBuf> = self
            .dirs
            .iter()
            .filter(|d| !roots.cover(d))
            .cloned()
            .collect();
        for gone in self.watched.difference(&wanted) {
            let _ = watcher.unwatch(gone);
        }
        let mut watched = BTreeSet::new();
        for dir in wanted {
            if self.watched.contains(&dir) {
                watched.insert(dir);
                continue;
            }
            match watcher.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watched.insert(dir);
                }
                Err(e) => {
                    tracing::warn!(target: "meshward::certs", dir = %dir.display(), error = %e, "cannot watch the directory of DestinationRule files; changes there are seen only when a request needs the files or the configuration changes");
                }
            }
        }
        self.watched = watched;
    }

    /// Whether `p` is in a watched directory.
    fn holds(&self, p: &Path) -> bool {
        let in_dir = |p: &Path| p.parent().is_some_and(|d| self.dirs.contains(d));
        in_dir(p) || in_dir(&canonical(p))
    }
}

/// The paths an event changed. Only changes count: reading the files (our
/// own reloads included) produces access events, which must not loop.
fn changed_paths(event: notify::Result<notify::Event>) -> Vec<PathBuf> {
    match event {
        Ok(e) if is_change(&e.kind) => e.paths,
        Ok(_) => Vec::new(),
        Err(e) => {
            tracing::warn!(target: "meshward::config", error = %e, "file watch error");
            Vec::new()
        }
    }
}

/// Reloads the configuration (and brings the listeners and the
/// DestinationRule watches in line with it) when any of `paths` is
/// configuration; else the workload's certificates when any is under
/// their directory; and the DestinationRule files when any is in one of
/// their directories. (A path is configuration when it is under a
/// configuration path, or under none of the others.)
fn reload(
    state: &State,
    listeners: &Listeners,
    roots: &Roots,
    dr: &mut DrWatches,
    paths: &[PathBuf],
) {
    let in_certs = |p: &PathBuf| canonical(p).starts_with(&roots.certs);
    let in_config = |p: &PathBuf| {
        let c = canonical(p);
        roots.config.iter().any(|r| c.starts_with(r))
    };
    let config_changed = paths
        .iter()
        .any(|p| !in_certs(p) && (in_config(p) || !dr.holds(p)));
    let certs_changed = paths.iter().any(in_certs);
    let dr_changed = paths.iter().any(|p| dr.holds(p));
    if config_changed {
        // A configuration reload rebuilds the TLS state too.
        match state.reload_config() {
            Ok(v) => {
                tracing::info!(target: "meshward::config", version = v, "configuration reloaded");
                // Bind errors are logged there and do not undo the change.
                listeners.reconcile();
                dr.follow(state, roots);
            }
            Err(e) => {
                state.metrics.config_rejected();
                tracing::error!(target: "meshward::config", error = %e, "configuration change refused; keeping the previous configuration");
            }
        }
    } else if certs_changed {
        match state.reload_certs() {
            Ok(()) => {
                tracing::info!(target: "meshward::certs", identity = %state.tls().credentials.id(), "certificates reloaded")
            }
            Err(e) => {
                state.metrics.config_rejected();
                tracing::error!(target: "meshward::certs", error = %e, "certificate change refused; keeping the previous certificates");
            }
        }
    }
    if dr_changed {
        // Only files whose contents changed are loaded again.
        state.reload_dr_files();
    }
}

fn is_change(kind: &notify::EventKind) -> bool {
    use notify::EventKind;
    use notify::event::ModifyKind;
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) => true,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        EventKind::Modify(_) => true,
        EventKind::Access(_) | EventKind::Any | EventKind::Other => false,
    }
}

fn canonical(p: &std::path::Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use notify::EventKind;
    use notify::event::{
        AccessKind, CreateKind, DataChange, MetadataKind, ModifyKind, RemoveKind, RenameMode,
    };

    use super::is_change;

    #[test]
    fn only_changes_trigger_reloads() {
        assert!(is_change(&EventKind::Create(CreateKind::File)));
        assert!(is_change(&EventKind::Modify(ModifyKind::Data(
            DataChange::Content
        ))));
        assert!(is_change(&EventKind::Modify(ModifyKind::Name(
            RenameMode::To
        ))));
        assert!(is_change(&EventKind::Remove(RemoveKind::File)));
        assert!(!is_change(&EventKind::Access(AccessKind::Any)));
        assert!(!is_change(&EventKind::Modify(ModifyKind::Metadata(
            MetadataKind::AccessTime
        ))));
    }
}
