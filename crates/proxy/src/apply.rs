//! Applies what a source publishes ([`crate::source`]), in one place and
//! one order: the files DestinationRules name, then the credentials, then
//! the configuration. A configuration is compiled and swapped in
//! atomically ([`State::apply_config`]); then the open connections are
//! re-checked against it and the listeners reconciled with it. What cannot
//! be applied is refused (logged, counted, shown in `/config_dump`), and
//! the proxy keeps serving with what it had.

use std::sync::Arc;

use tokio::sync::watch;

use crate::listeners::Listeners;
use crate::source::{ConfigUpdate, Credentials, LocalFiles, Published, Source, SourceState};
use crate::state::State;

/// The receiving ends the applier follows, with what it last applied.
#[derive(Debug)]
pub(crate) struct Applier {
    pub config: watch::Receiver<Published<ConfigUpdate>>,
    pub credentials: watch::Receiver<Published<Credentials>>,
    pub files: watch::Receiver<Arc<LocalFiles>>,
    pub state: Arc<State>,
    pub listeners: Arc<Listeners>,
    /// The revisions of the configuration and credentials the state was
    /// built from.
    pub seen: (u64, u64),
    /// The files the state was built from.
    pub files_seen: Arc<LocalFiles>,
}

impl Applier {
    /// Applies each publication until the source is gone. Compiling a
    /// configuration is CPU work: it runs on the blocking pool, so the
    /// data path is not held up (with one worker thread, say).
    pub(crate) async fn run(mut self) {
        // Not read from the channels here: what was published between
        // the start and this task's first poll is still to be applied.
        let mut seen = self.seen;
        let mut files_seen = Arc::clone(&self.files_seen);
        loop {
            tokio::select! {
                r = self.config.changed() => if r.is_err() { return },
                r = self.credentials.changed() => if r.is_err() { return },
                r = self.files.changed() => if r.is_err() { return },
            }
            let files = Arc::clone(&self.files.borrow_and_update());
            let files = (!Arc::ptr_eq(&files, &files_seen)).then(|| {
                files_seen = Arc::clone(&files);
                files
            });
            let credentials = self.credentials.borrow_and_update().clone();
            let credentials = (credentials.revision() != seen.1).then(|| {
                seen.1 = credentials.revision();
                credentials
            });
            let config = self.config.borrow_and_update().clone();
            let config = (config.revision() != seen.0).then(|| {
                seen.0 = config.revision();
                config
            });
            let state = Arc::clone(&self.state);
            let listeners = Arc::clone(&self.listeners);
            let applied = tokio::task::spawn_blocking(move || {
                if let Some(files) = files {
                    state.apply_files(files);
                }
                if let Some(c) = credentials {
                    credentials_published(&state, c);
                }
                if let Some(c) = config {
                    config_published(&state, &listeners, c);
                }
            })
            .await;
            if let Err(e) = applied {
                // A panic while applying: the state is whatever the last
                // successful swap left, which is consistent.
                tracing::error!(target: "meshward::config", error = %e, "applying an update failed");
            }
        }
    }
}

fn config_published(state: &State, listeners: &Listeners, published: Published<ConfigUpdate>) {
    match published {
        Published::Pending => {}
        Published::Update { content, .. } => match state.apply_config(&content) {
            Ok(snapshot) => {
                let v = snapshot.version;
                if let Some(outcome) = &content.outcome {
                    outcome.report(Ok(v));
                }
                let closed = state.tcp_conns.recheck(&snapshot);
                if closed > 0 {
                    tracing::info!(target: "meshward::config", closed, "closed TCP connections and WebSocket tunnels the new policy denies");
                }
                let before = state
                    .sources
                    .loaded(Source::Config, Some(v), &state.metrics);
                if before == SourceState::Lost {
                    tracing::info!(target: "meshward::config", source = "config", "configuration source back");
                }
                tracing::info!(target: "meshward::config", version = v, "configuration reloaded");
                // Bind errors are logged there and do not undo the change.
                listeners.reconcile();
            }
            Err(e) => {
                if let Some(outcome) = &content.outcome {
                    outcome.report(Err(e.to_string()));
                }
                refused(state, Source::Config, e.to_string());
            }
        },
        Published::Problem {
            state: s, error, ..
        } => match s {
            SourceState::Lost => lost(state, Source::Config, error),
            SourceState::Held => {
                tracing::warn!(target: "meshward::config", source = "config", error = %error, "configuration change held; keeping the previous configuration");
                state
                    .sources
                    .set(Source::Config, SourceState::Held, error, &state.metrics);
            }
            SourceState::Refused | SourceState::Ok => refused(state, Source::Config, error),
        },
    }
}

fn credentials_published(state: &State, published: Published<Credentials>) {
    match published {
        Published::Pending => {}
        Published::Update { content, .. } => match state.apply_credentials(content) {
            Ok(()) => {
                let before = state.sources.loaded(Source::Certs, None, &state.metrics);
                if before == SourceState::Lost {
                    tracing::info!(target: "meshward::certs", source = "certs", "certificate source back");
                }
                tracing::info!(target: "meshward::certs", identity = %state.tls().credentials.id(), "certificates reloaded");
            }
            Err(e) => refused(state, Source::Certs, e.to_string()),
        },
        Published::Problem {
            state: s, error, ..
        } => match s {
            SourceState::Lost => lost(state, Source::Certs, error),
            SourceState::Held | SourceState::Refused | SourceState::Ok => {
                refused(state, Source::Certs, error);
            }
        },
    }
}

/// A change `source` published that is refused: counted, shown, logged.
fn refused(state: &State, source: Source, error: String) {
    state.metrics.config_rejected();
    match source {
        Source::Config => {
            tracing::error!(target: "meshward::config", error = %error, "configuration change refused; keeping the previous configuration")
        }
        Source::Certs => {
            tracing::error!(target: "meshward::certs", error = %error, "certificate change refused; keeping the previous certificates")
        }
    }
    state
        .sources
        .set(source, SourceState::Refused, error, &state.metrics);
}

/// Records that `source` is lost; logs once when it becomes so.
fn lost(state: &State, source: Source, why: String) {
    let before = state
        .sources
        .set(source, SourceState::Lost, why.clone(), &state.metrics);
    if before == SourceState::Lost {
        return;
    }
    let again = match state.sources.rescan() {
        Some(every) => format!(" and looking again every {}s", every.as_secs()),
        None => String::new(),
    };
    match source {
        Source::Config => tracing::warn!(
            target: "meshward::config",
            source = "config",
            error = %why,
            version = state.snapshot().version,
            "configuration source lost; keeping the last good configuration{again}"
        ),
        Source::Certs => tracing::warn!(
            target: "meshward::certs",
            source = "certs",
            error = %why,
            identity = %state.tls().credentials.id(),
            "certificate source lost; keeping the certificates in use{again}"
        ),
    }
}
