//! Reloads configuration and certificates when their files change. A
//! change that does not load is refused (logged, counted) and the proxy
//! keeps serving with what it had.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};

use crate::state::State;

/// Keeps the file watches alive.
pub struct Watcher {
    _debouncer: Debouncer<notify::RecommendedWatcher, RecommendedCache>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher").finish_non_exhaustive()
    }
}

impl Watcher {
    pub fn start(state: Arc<State>) -> Result<Watcher, String> {
        let certs_dir = canonical(&state.bootstrap.certs_dir);
        let handler_state = Arc::clone(&state);
        let mut debouncer = new_debouncer(Duration::from_millis(200), None, move |result: DebounceEventResult| {
            let Ok(events) = result else { return };
            // Only changes count: reading the files (our own reloads
            // included) produces access events, which must not loop.
            let paths: Vec<PathBuf> = events
                .iter()
                .filter(|e| is_change(&e.kind))
                .flat_map(|e| e.paths.iter().cloned())
                .collect();
            if paths.is_empty() {
                return;
            }
            let certs_changed = paths.iter().any(|p| canonical(p).starts_with(&certs_dir));
            let config_changed = paths.iter().any(|p| !canonical(p).starts_with(&certs_dir));
            if config_changed {
                match handler_state.reload_config() {
                    Ok(v) => tracing::info!(target: "meshward::config", version = v, "configuration reloaded"),
                    Err(e) => {
                        handler_state.metrics.config_rejected();
                        tracing::error!(target: "meshward::config", error = %e, "configuration change refused; keeping the previous configuration");
                    }
                }
            } else if certs_changed {
                match handler_state.reload_certs() {
                    Ok(()) => tracing::info!(target: "meshward::certs", identity = %handler_state.tls().credentials.id(), "certificates reloaded"),
                    Err(e) => {
                        handler_state.metrics.config_rejected();
                        tracing::error!(target: "meshward::certs", error = %e, "certificate change refused; keeping the previous certificates");
                    }
                }
            }
        })
        .map_err(|e| e.to_string())?;
        let b = &state.bootstrap;
        for p in b
            .config_paths
            .iter()
            .chain(b.mesh_config.iter())
            .chain(std::iter::once(&b.certs_dir))
        {
            debouncer
                .watch(p, RecursiveMode::Recursive)
                .map_err(|e| format!("{}: {e}", p.display()))?;
        }
        Ok(Watcher {
            _debouncer: debouncer,
        })
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
