//! Whether what runs is what each source says: for `/config_dump`
//! (`source`), the `meshward_config_source_up` gauge, and the logs of
//! [`crate::apply`] (each state change is logged once, not every scan).
//!
//! A source is `ok` (what runs is what it says), `lost` (its path is
//! missing or cannot be read: the last good state keeps running; the file
//! source looks again every [`super::files::RESCAN`]), `held` (a
//! configuration file that had resources is empty: taken for a file being
//! written, the change waits) or `refused` (the files do not load; the
//! last good state keeps running, or the proxy refused what they say).
//! The proxy stays ready in every state:
//! it still enforces its last good configuration, as an Istio sidecar
//! does while istiod is unreachable.

use std::sync::Mutex;

use serde_json::json;
use time::OffsetDateTime;

use super::SourceInfo;
use crate::telemetry::Metrics;

/// One of the proxy's sources of files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The configuration paths and the mesh config file.
    Config,
    /// The workload's certificate directory.
    Certs,
}

impl Source {
    pub const ALL: [Source; 2] = [Source::Config, Source::Certs];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Certs => "certs",
        }
    }

    fn index(self) -> usize {
        match self {
            Source::Config => 0,
            Source::Certs => 1,
        }
    }
}

/// Whether what runs is what a source's files say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceState {
    Ok,
    /// Missing or unreadable; the last good state is kept.
    Lost,
    /// A configuration file (or directory) that had resources is empty;
    /// the change waits until it has content again or is deleted.
    Held,
    /// The files do not load; the last good state is kept.
    Refused,
}

impl SourceState {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceState::Ok => "ok",
            SourceState::Lost => "lost",
            SourceState::Held => "held",
            SourceState::Refused => "refused",
        }
    }
}

#[derive(Debug)]
struct Status {
    paths: Vec<String>,
    state: SourceState,
    /// Why the state is not `ok`.
    error: Option<String>,
    /// When the state began.
    since: OffsetDateTime,
    /// The last successful load, and the configuration version it made.
    loaded_at: OffsetDateTime,
    version: Option<u64>,
}

/// The state of each source. Lives in the proxy's [`crate::State`].
#[derive(Debug)]
pub struct Sources {
    kind: &'static str,
    watched: bool,
    rescan: Option<std::time::Duration>,
    status: Mutex<[Status; 2]>,
}

impl Sources {
    /// Both sources as loaded at start (configuration version 1).
    pub fn new(info: &SourceInfo) -> Sources {
        let now = OffsetDateTime::now_utc();
        let status = |paths: Vec<String>, version| Status {
            paths,
            state: SourceState::Ok,
            error: None,
            since: now,
            loaded_at: now,
            version,
        };
        Sources {
            kind: info.kind,
            watched: info.watched,
            rescan: info.rescan,
            status: Mutex::new([
                status(info.config.clone(), Some(1)),
                status(info.credentials.clone(), None),
            ]),
        }
    }

    /// How often the source looks again, if it polls.
    pub fn rescan(&self) -> Option<std::time::Duration> {
        self.rescan
    }

    /// Records that `source` is in `state` for `error`; returns the state
    /// it was in before. The gauge follows (a loss is counted once).
    pub fn set(
        &self,
        source: Source,
        state: SourceState,
        error: String,
        metrics: &Metrics,
    ) -> SourceState {
        let mut all = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut all[source.index()];
        let before = s.state;
        if before != state {
            s.since = OffsetDateTime::now_utc();
        }
        s.state = state;
        s.error = Some(error);
        metrics.source_up(source.as_str(), state != SourceState::Lost);
        before
    }

    /// Records a successful load of `source` (with the configuration
    /// version it made); returns the state it was in before.
    pub fn loaded(&self, source: Source, version: Option<u64>, metrics: &Metrics) -> SourceState {
        let mut all = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut all[source.index()];
        let before = s.state;
        let now = OffsetDateTime::now_utc();
        if before != SourceState::Ok {
            s.since = now;
        }
        s.state = SourceState::Ok;
        s.error = None;
        s.loaded_at = now;
        if version.is_some() {
            s.version = version;
        }
        metrics.source_up(source.as_str(), true);
        before
    }

    /// For `/config_dump`.
    pub fn describe(&self) -> serde_json::Value {
        let all = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let one = |s: &Status| {
            json!({
                "paths": s.paths,
                "state": s.state.as_str(),
                "error": s.error,
                "since": rfc3339(s.since),
                "last_load": {"at": rfc3339(s.loaded_at), "version": s.version},
            })
        };
        json!({
            "kind": self.kind,
            "watched": self.watched,
            "rescan_interval_s": self.rescan.map(|d| d.as_secs()),
            "config": one(&all[Source::Config.index()]),
            "certs": one(&all[Source::Certs.index()]),
        })
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
