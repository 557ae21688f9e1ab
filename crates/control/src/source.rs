//! The embedded config source: files and directories of Istio YAML,
//! watched, validated whole, published as [`Snapshot`]s.
//!
//! A thread reads the paths when a file event arrives (after 50 ms more
//! events are gathered, so that a burst of writes is read once) and every
//! [`RESCAN`] regardless, comparing a digest of what it read with the last
//! attempt: events make a change visible within ~100 ms; the rescan
//! catches what events miss (a directory removed and created again, a file
//! system without events) within [`RESCAN`].
//!
//! A change is loaded with `meshward_config::Loader` as `meshward proxy
//! --config` loads it. If any document has an error, the change is
//! refused whole: every diagnostic is logged with file:line at error level,
//! `meshward_config_rejected_total` counts it, and the last good snapshot
//! keeps being served. A configuration file that held documents and holds
//! none now (an editor that truncates, then writes), or a directory that
//! held some and has none, is taken for a file being written: the change
//! waits until the file has content again (deleting a file does remove its
//! resources). That is the rule of the proxy's file source.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aws_lc_rs::digest::{Context, SHA256};
use meshward_config::{Diagnostics, Loaded, Loader, MAX_FILE_BYTES, config_files};
use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::snapshot::{Snapshot, SnapshotError, SourceText};

/// The longest a change waits to be read when no file event announces it.
pub const RESCAN: Duration = Duration::from_secs(1);

/// How long events are gathered before the files are read.
const SETTLE: Duration = Duration::from_millis(50);

/// Why the source could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The first load failed; every diagnostic, with file:line.
    #[error("the configuration is invalid:\n{0}")]
    Invalid(Diagnostics),
    /// The first load held something the snapshot could not be built from.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The files kept changing while being read.
    #[error("the configuration files kept changing while being read")]
    Unstable,
    /// The watching thread could not be started.
    #[error("cannot start the config watcher thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The running source. Dropping it stops the watching thread; the
/// receivers keep the last snapshot.
#[derive(Debug)]
pub struct ConfigSource {
    events: mpsc::Sender<Event>,
    thread: Option<JoinHandle<()>>,
}

enum Event {
    Changed,
    Stop,
}

impl ConfigSource {
    /// Loads `paths` (files, or directories of `.yaml`/`.yml`/`.json`
    /// files) and the mesh settings file, and starts watching them. The
    /// first load must succeed: otherwise the error lists every diagnostic.
    pub fn start(
        paths: Vec<PathBuf>,
        mesh_config: Option<PathBuf>,
        metrics: Arc<Metrics>,
    ) -> Result<(ConfigSource, watch::Receiver<Arc<Snapshot>>), SourceError> {
        // Files that change while being read are read again (a few times:
        // then the error is reported).
        let mut attempt = 0;
        let (reading, loaded, snapshot) = loop {
            attempt += 1;
            let reading = Reading::of(&paths, mesh_config.as_deref());
            let loaded = match reading.load() {
                Ok(loaded) => loaded,
                Err(Refused::Invalid(diags)) => return Err(SourceError::Invalid(diags)),
                Err(Refused::Raced) if attempt < 3 => continue,
                Err(Refused::Raced) => return Err(SourceError::Unstable),
            };
            match Snapshot::build(&loaded, &reading.sources, reading.mesh.as_ref()) {
                Ok(snapshot) => break (reading, loaded, snapshot),
                Err(_) if attempt < 3 => continue,
                Err(e) => return Err(e.into()),
            }
        };
        log_warnings(&loaded.warnings);
        tracing::info!(
            version = snapshot.version(),
            documents = snapshot.document_count(),
            "config loaded"
        );
        metrics.config_accepted.inc();
        let (tx, rx) = watch::channel(Arc::new(snapshot));
        let (events, inbox) = mpsc::channel();
        let watched = identities(&paths, mesh_config.as_deref());
        let watcher = watch_paths(&paths, mesh_config.as_deref(), events.clone());
        let state = Watching {
            paths,
            mesh_config,
            metrics,
            publish: tx,
            last_digest: reading.digest,
            last_documents: loaded.documents,
            watcher,
            watched,
        };
        let thread = std::thread::Builder::new()
            .name("config-source".into())
            .spawn(move || state.run(inbox))
            .map_err(SourceError::Thread)?;
        Ok((
            ConfigSource {
                events,
                thread: Some(thread),
            },
            rx,
        ))
    }
}

impl Drop for ConfigSource {
    fn drop(&mut self) {
        let _ = self.events.send(Event::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The watching thread's state.
struct Watching {
    paths: Vec<PathBuf>,
    mesh_config: Option<PathBuf>,
    metrics: Arc<Metrics>,
    publish: watch::Sender<Arc<Snapshot>>,
    /// Digest of the last reading acted on (accepted, refused or held).
    last_digest: [u8; 32],
    /// Documents per file at the last accepted load.
    last_documents: BTreeMap<String, usize>,
    watcher: Option<notify::RecommendedWatcher>,
    /// The identities of the watched paths when they were watched.
    watched: Vec<Option<(u64, u64)>>,
}

impl Watching {
    fn run(mut self, inbox: mpsc::Receiver<Event>) {
        loop {
            match inbox.recv_timeout(RESCAN) {
                Ok(Event::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Ok(Event::Changed) => {
                    // Gather the rest of a burst, for at most SETTLE.
                    let until = Instant::now() + SETTLE;
                    while let Some(left) = until.checked_duration_since(Instant::now()) {
                        match inbox.recv_timeout(left) {
                            Ok(Event::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                                return;
                            }
                            Ok(Event::Changed) => {}
                            Err(mpsc::RecvTimeoutError::Timeout) => break,
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            // Watches first: a change made after the reading below is then
            // announced by an event.
            self.rewatch_replaced();
            self.check();
        }
    }

    /// Watches again the paths that are another file or directory than
    /// when they were watched (replaced by a rename): the old watch follows
    /// the old inode.
    fn rewatch_replaced(&mut self) {
        let now = identities(&self.paths, self.mesh_config.as_deref());
        if now == self.watched {
            return;
        }
        if let Some(w) = self.watcher.as_mut() {
            tracing::debug!("config paths replaced; watching them again");
            add_watches(w, &self.paths, self.mesh_config.as_deref(), true);
        }
        self.watched = now;
    }

    /// Reads the paths; acts when what they hold changed.
    fn check(&mut self) {
        let reading = Reading::of(&self.paths, self.mesh_config.as_deref());
        if reading.digest != self.last_digest {
            self.apply(reading);
        }
    }

    /// Loads a reading that differs from the last one.
    fn apply(&mut self, reading: Reading) {
        self.last_digest = reading.digest;
        let current = self.publish.borrow().clone();
        let loaded = match reading.load() {
            Ok(loaded) => loaded,
            Err(Refused::Raced) => {
                self.last_digest = [0; 32];
                return;
            }
            Err(Refused::Invalid(diags)) => {
                for d in diags.errors() {
                    tracing::error!(diagnostic = %d, "config change rejected");
                }
                self.metrics.config_rejected.inc();
                tracing::error!(
                    errors = diags.errors().count(),
                    serving = current.version(),
                    "config change rejected whole; the last good snapshot is still served"
                );
                return;
            }
        };
        if let Some(held) =
            meshward_config::emptied(&self.last_documents, &loaded.documents, &self.paths)
        {
            tracing::warn!(serving = current.version(), "{held}");
            return;
        }
        log_warnings(&loaded.warnings);
        let snapshot = match Snapshot::build(&loaded, &reading.sources, reading.mesh.as_ref()) {
            Ok(s) => s,
            Err(e) => {
                // Files changed while being read: read again soon.
                tracing::warn!(error = %e, "config change not applied; reading again");
                self.last_digest = [0; 32];
                return;
            }
        };
        self.last_documents = loaded.documents;
        if snapshot.version() == current.version() {
            tracing::debug!(
                version = snapshot.version(),
                "config files changed, content did not"
            );
            return;
        }
        tracing::info!(
            version = snapshot.version(),
            previous = current.version(),
            documents = snapshot.document_count(),
            "config change accepted"
        );
        self.metrics.config_accepted.inc();
        self.publish.send_replace(Arc::new(snapshot));
    }
}

fn log_warnings(warnings: &Diagnostics) {
    for d in warnings.warnings() {
        tracing::warn!(diagnostic = %d, "config warning");
    }
}

/// Watches the configured paths (a directory recursively, a file through
/// its parent directory, so that a rename over it is seen). Failing to
/// watch is not fatal: the rescan still sees every change.
fn watch_paths(
    paths: &[PathBuf],
    mesh_config: Option<&Path>,
    events: mpsc::Sender<Event>,
) -> Option<notify::RecommendedWatcher> {
    let handler = move |res: notify::Result<notify::Event>| {
        let relevant = match res {
            Ok(ev) => match ev.kind {
                EventKind::Access(notify::event::AccessKind::Close(
                    notify::event::AccessMode::Write,
                )) => true,
                EventKind::Access(_) => false,
                _ => true,
            },
            Err(_) => true,
        };
        if relevant {
            let _ = events.send(Event::Changed);
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config files; rescanning every {RESCAN:?}");
            return None;
        }
    };
    add_watches(&mut watcher, paths, mesh_config, false);
    Some(watcher)
}

/// The device and inode of each path's watch target (`None` when it is
/// missing).
fn identities(paths: &[PathBuf], mesh_config: Option<&Path>) -> Vec<Option<(u64, u64)>> {
    use std::os::unix::fs::MetadataExt as _;
    paths
        .iter()
        .map(PathBuf::as_path)
        .chain(mesh_config)
        .map(|p| {
            let target = watch_target(p).0;
            std::fs::metadata(target).ok().map(|m| (m.dev(), m.ino()))
        })
        .collect()
}

/// What watching `path` watches: a directory itself, recursively; a file
/// through its parent (so that a rename over it is seen).
fn watch_target(path: &Path) -> (&Path, RecursiveMode) {
    if path.is_dir() {
        (path, RecursiveMode::Recursive)
    } else {
        match path.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(parent) => (parent, RecursiveMode::NonRecursive),
            None => (Path::new("."), RecursiveMode::NonRecursive),
        }
    }
}

/// Watches each configured path. With `again`, drops the watch first: a
/// directory replaced since (renamed away, another one renamed in) is
/// another inode, which the old watch does not see.
fn add_watches(
    watcher: &mut notify::RecommendedWatcher,
    paths: &[PathBuf],
    mesh_config: Option<&Path>,
    again: bool,
) {
    for path in paths.iter().map(PathBuf::as_path).chain(mesh_config) {
        let (target, mode) = watch_target(path);
        if again {
            let _ = watcher.unwatch(target);
        }
        if let Err(e) = watcher.watch(target, mode) {
            tracing::warn!(path = %target.display(), error = %e, "cannot watch; rescanning every {RESCAN:?}");
        }
    }
}

/// What the paths held at one moment.
struct Reading {
    sources: Vec<SourceText>,
    mesh: Option<SourceText>,
    /// Paths that could not be read: the loader reads them again, to report
    /// the problem as it does.
    unreadable: Vec<PathBuf>,
    mesh_unreadable: Option<PathBuf>,
    digest: [u8; 32],
}

impl Reading {
    fn of(paths: &[PathBuf], mesh_config: Option<&Path>) -> Reading {
        let mut h = Context::new(&SHA256);
        let mut sources = Vec::new();
        let mut unreadable = Vec::new();
        for root in paths {
            let files = match config_files(root) {
                Ok(files) => files,
                Err(e) => {
                    feed(&mut h, format!("lost {} {e}", root.display()).as_bytes());
                    unreadable.push(root.clone());
                    continue;
                }
            };
            for file in files {
                match read_text(&file) {
                    Ok(text) => {
                        let name = file.display().to_string();
                        feed(&mut h, name.as_bytes());
                        feed(&mut h, text.as_bytes());
                        sources.push(SourceText {
                            origin: relative(root, &file),
                            name,
                            text,
                        });
                    }
                    Err(e) => {
                        feed(
                            &mut h,
                            format!("unreadable {} {e}", file.display()).as_bytes(),
                        );
                        unreadable.push(file);
                    }
                }
            }
        }
        let mut mesh = None;
        let mut mesh_unreadable = None;
        if let Some(path) = mesh_config {
            match read_text(path) {
                Ok(text) => {
                    let name = path.display().to_string();
                    feed(&mut h, b"mesh");
                    feed(&mut h, name.as_bytes());
                    feed(&mut h, text.as_bytes());
                    mesh = Some(SourceText {
                        origin: relative(path, path),
                        name,
                        text,
                    });
                }
                Err(e) => {
                    feed(&mut h, format!("mesh unreadable {e}").as_bytes());
                    mesh_unreadable = Some(path.to_path_buf());
                }
            }
        }
        let mut digest = [0; 32];
        digest.copy_from_slice(h.finish().as_ref());
        Reading {
            sources,
            mesh,
            unreadable,
            mesh_unreadable,
            digest,
        }
    }

    fn load(&self) -> Result<Loaded, Refused> {
        let mut loader = Loader::new();
        for s in &self.sources {
            loader.add_source(&s.name, &s.text);
        }
        for p in &self.unreadable {
            loader.add_path(p);
        }
        if let Some(m) = &self.mesh {
            loader.add_mesh_config_source(&m.name, &m.text);
        }
        if let Some(p) = &self.mesh_unreadable {
            loader.add_mesh_config_path(p);
        }
        let loaded = loader.finish().map_err(Refused::Invalid)?;
        if !self.unreadable.is_empty() || self.mesh_unreadable.is_some() {
            // Read by the loader but not by us (the file changed between
            // the two reads): not a state to publish; read again.
            return Err(Refused::Raced);
        }
        Ok(loaded)
    }
}

/// Why a reading was not loaded.
enum Refused {
    /// The configuration has errors.
    Invalid(Diagnostics),
    /// The files changed while being read.
    Raced,
}

/// Reads a file of at most `MAX_FILE_BYTES` bytes of UTF-8.
fn read_text(path: &Path) -> std::io::Result<String> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::other("file too large"));
    }
    String::from_utf8(bytes).map_err(|_| std::io::Error::other("not UTF-8"))
}

/// `file` relative to the configured `root` (its file name when the root
/// is the file itself).
fn relative(root: &Path, file: &Path) -> String {
    match file.strip_prefix(root) {
        Ok(rel) if !rel.as_os_str().is_empty() => rel.display().to_string(),
        _ => file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| file.display().to_string()),
    }
}

fn feed(h: &mut Context, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}
