//! Reloads configuration and certificates when their files change. A
//! change that does not load is refused (logged, counted) and the proxy
//! keeps serving with what it had.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use notify::{RecursiveMode, Watcher as _};

use crate::listeners::Listeners;
use crate::state::State;

/// Changes are applied once the files have been quiet this long, so a
/// writer's several steps (or a rotation's key and certificate) apply as
/// one.
const QUIET: Duration = Duration::from_millis(200);

/// Keeps the file watches alive; dropping it stops the reload thread.
pub struct Watcher {
    _watcher: notify::RecommendedWatcher,
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
                    reload(&state, &listeners, &certs_dir, &paths);
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(Watcher { _watcher: watcher })
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

/// Reloads the configuration (and brings the listeners in line with it)
/// when any of `paths` is outside the certificate directory, else the
/// certificates.
fn reload(state: &State, listeners: &Listeners, certs_dir: &std::path::Path, paths: &[PathBuf]) {
    let config_changed = paths.iter().any(|p| !canonical(p).starts_with(certs_dir));
    if config_changed {
        // A configuration reload rebuilds the TLS state too.
        match state.reload_config() {
            Ok(v) => {
                tracing::info!(target: "meshward::config", version = v, "configuration reloaded");
                // Bind errors are logged there and do not undo the change.
                listeners.reconcile();
            }
            Err(e) => {
                state.metrics.config_rejected();
                tracing::error!(target: "meshward::config", error = %e, "configuration change refused; keeping the previous configuration");
            }
        }
    } else {
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
