//! Fingerprints of what the proxy loads: for each source, a digest of the
//! paths, identities (device, inode), sizes, modification times and
//! contents of exactly the files its loader reads, or why its path cannot
//! be read (the source is lost). Comparing fingerprints, not interpreting
//! file events, decides whether anything changed, so a change is never
//! missed however the files were replaced (a rename over them, a symbolic
//! link swapped, the directory or its parent replaced). A file rewritten
//! or touched counts as a change even with the same contents, as with
//! file events: that is how an operator asks for another try (of a
//! listener whose port was taken, say).
//!
//! A file is read again only when its metadata (device, inode, size,
//! modification and change times) differs from the last scan's, or when it
//! changed less than [`RACY`] before that scan read it: timestamps are
//! coarse, so a second write in the same tick, with the same size, would
//! otherwise look like no change (git's "racily clean" entries, the same
//! problem). An idle proxy reads only metadata.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use aws_lc_rs::digest::{Context, SHA256};

use super::files::FilePaths;

/// A file whose change time is less than this before the moment it was
/// read is read again at the next scan (see the module's documentation).
/// Local file systems stamp times to within a few milliseconds; the margin
/// also covers a network file system's clock running somewhat behind.
pub const RACY: Duration = Duration::from_secs(2);

/// The files of the workload's certificate directory that are loaded.
pub const CERT_FILES: [&str; 3] = ["key.pem", "cert-chain.pem", "root-cert.pem"];

/// What a source's files hold, or why they cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fingerprint {
    /// SHA-256 over every file's path and contents (or read error).
    Files([u8; 32]),
    /// A path of the source is missing or cannot be listed.
    Lost(String),
}

/// The fingerprints of both sources at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    pub config: Fingerprint,
    pub certs: Fingerprint,
}

/// Takes [`Scan`]s, remembering each file's digest with its metadata.
#[derive(Debug, Default)]
pub struct Scanner {
    cache: HashMap<PathBuf, Cached>,
}

#[derive(Debug, Clone)]
struct Cached {
    meta: Meta,
    digest: [u8; 32],
    read_at: SystemTime,
}

impl Scanner {
    pub fn scan(&mut self, b: &FilePaths) -> Scan {
        // Files no longer read are forgotten.
        let mut next = HashMap::new();
        let config = self.config(b, &mut next);
        let certs = self.certs(&b.certs_dir, &mut next);
        self.cache = next;
        Scan { config, certs }
    }

    /// The files the configuration loader reads: those under each
    /// configuration path (`meshward_config::config_files`) and the mesh
    /// config file.
    fn config(&self, b: &FilePaths, next: &mut HashMap<PathBuf, Cached>) -> Fingerprint {
        let mut h = Context::new(&SHA256);
        for root in &b.config_paths {
            let files = match meshward_config::config_files(root) {
                Ok(files) => files,
                Err(e) => return Fingerprint::Lost(format!("{}: {e}", root.display())),
            };
            h.update(b"root\0");
            h.update(root.as_os_str().as_encoded_bytes());
            for f in files {
                self.file(&f, &mut h, next);
            }
        }
        if let Some(mc) = &b.mesh_config {
            if let Err(e) = std::fs::metadata(mc) {
                return Fingerprint::Lost(format!("{}: {e}", mc.display()));
            }
            h.update(b"mesh\0");
            self.file(mc, &mut h, next);
        }
        Fingerprint::Files(finish(h))
    }

    /// The certificate files; the directory must be listable.
    fn certs(&self, dir: &Path, next: &mut HashMap<PathBuf, Cached>) -> Fingerprint {
        if let Err(e) = std::fs::read_dir(dir) {
            return Fingerprint::Lost(format!("{}: {e}", dir.display()));
        }
        let mut h = Context::new(&SHA256);
        for name in CERT_FILES {
            self.file(&dir.join(name), &mut h, next);
        }
        Fingerprint::Files(finish(h))
    }

    /// Adds `path` and its contents' digest (or why it cannot be read) to
    /// `h`.
    fn file(&self, path: &Path, h: &mut Context, next: &mut HashMap<PathBuf, Cached>) {
        h.update(path.as_os_str().as_encoded_bytes());
        h.update(b"\0");
        let error = |h: &mut Context, e: std::io::Error| {
            h.update(b"error\0");
            h.update(format!("{:?}", e.kind()).as_bytes());
        };
        let m = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) => return error(h, e),
        };
        let meta = Meta::of(&m);
        // Not the change time: a `chmod` is no reason to reload.
        h.update(format!("{}:{}:{}:{:?}\0", meta.dev, meta.ino, meta.len, meta.mtime).as_bytes());
        if let Some(c) = self.cache.get(path)
            && c.meta == meta
            && meta.settled(c.read_at)
        {
            h.update(&c.digest);
            next.insert(path.to_path_buf(), c.clone());
            return;
        }
        if m.len() > meshward_config::MAX_FILE_BYTES {
            // The loader refuses it unread; so does the scan (its size
            // and times stand for its contents).
            h.update(b"oversized\0");
            return;
        }
        // Taken before reading: a change during the read is newer.
        let read_at = SystemTime::now();
        match std::fs::read(path) {
            Ok(bytes) => {
                let digest = finish({
                    let mut d = Context::new(&SHA256);
                    d.update(&bytes);
                    d
                });
                h.update(&digest);
                next.insert(
                    path.to_path_buf(),
                    Cached {
                        meta,
                        digest,
                        read_at,
                    },
                );
            }
            Err(e) => error(h, e),
        }
    }
}

fn finish(h: Context) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(h.finish().as_ref());
    out
}

/// What a file's metadata says of its contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Meta {
    #[cfg(unix)]
    fn of(m: &std::fs::Metadata) -> Meta {
        use std::os::unix::fs::MetadataExt;
        Meta {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    #[cfg(not(unix))]
    fn of(m: &std::fs::Metadata) -> Meta {
        Meta {
            dev: 0,
            ino: 0,
            len: m.len(),
            mtime: (0, 0),
            ctime: (0, 0),
        }
    }

    /// Whether contents read at `read_at` still stand for a file with this
    /// metadata: its last change came at least [`RACY`] before the read,
    /// so any later change has a later change time. Every write, rename
    /// or `utimes` sets the change time to the current time.
    fn settled(&self, read_at: SystemTime) -> bool {
        if cfg!(not(unix)) {
            return false;
        }
        let (secs, nanos) = self.ctime;
        let (Ok(secs), Ok(nanos)) = (u64::try_from(secs), u32::try_from(nanos)) else {
            return false;
        };
        let changed = SystemTime::UNIX_EPOCH + Duration::new(secs, nanos);
        changed + RACY <= read_at
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::{FilePaths, Fingerprint, Scanner};

    fn bootstrap(config: PathBuf, certs: PathBuf) -> FilePaths {
        FilePaths {
            config_paths: vec![config],
            mesh_config: None,
            certs_dir: certs,
        }
    }

    #[test]
    fn a_change_is_seen_however_the_files_were_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let config = tmp.path().join("config");
        let certs = tmp.path().join("certs");
        std::fs::create_dir_all(config.join("..v1")).unwrap();
        std::fs::create_dir_all(&certs).unwrap();
        let b = bootstrap(config.clone(), certs.clone());
        let mut s = Scanner::default();

        std::fs::write(config.join("a.yaml"), "kind: A\n").unwrap();
        let first = s.scan(&b);
        assert!(matches!(first.config, Fingerprint::Files(_)));
        assert_eq!(s.scan(&b), first, "nothing changed");

        // Rewritten in place at once, same size, same modification time
        // (as a second write within one timestamp tick leaves it): the
        // file changed too recently to be trusted by its metadata, so its
        // contents tell.
        let mtime = std::fs::metadata(config.join("a.yaml"))
            .unwrap()
            .modified()
            .unwrap();
        std::fs::write(config.join("a.yaml"), "kind: B\n").unwrap();
        let f = std::fs::File::options()
            .write(true)
            .open(config.join("a.yaml"))
            .unwrap();
        f.set_modified(mtime).unwrap();
        drop(f);
        let second = s.scan(&b);
        assert_ne!(second.config, first.config);
        assert_eq!(second.certs, first.certs);

        // Rewritten with the same contents (a new inode): a change, as
        // an operator's way to ask for another try.
        std::fs::write(config.join(".a.tmp"), "kind: B\n").unwrap();
        std::fs::rename(config.join(".a.tmp"), config.join("a.yaml")).unwrap();
        let third = s.scan(&b);
        assert_ne!(third.config, second.config);

        // A file that is not configuration (no .yaml/.yml/.json) or is
        // hidden does not count.
        std::fs::write(config.join("notes.txt"), "x").unwrap();
        std::fs::write(config.join(".swp.yaml"), "x").unwrap();
        assert_eq!(s.scan(&b), third);

        // A Kubernetes volume: files are links through `..data`, swapped.
        std::fs::write(config.join("..v1/p.yaml"), "kind: P1\n").unwrap();
        std::os::unix::fs::symlink("..v1", config.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/p.yaml", config.join("p.yaml")).unwrap();
        let linked = s.scan(&b);
        std::fs::create_dir(config.join("..v2")).unwrap();
        std::fs::write(config.join("..v2/p.yaml"), "kind: P2\n").unwrap();
        std::os::unix::fs::symlink("..v2", config.join("..data_tmp")).unwrap();
        std::fs::rename(config.join("..data_tmp"), config.join("..data")).unwrap();
        let swapped = s.scan(&b);
        assert_ne!(swapped, linked);

        // The directory gone: lost, saying which path and why.
        std::fs::rename(&config, tmp.path().join("old")).unwrap();
        match s.scan(&b).config {
            Fingerprint::Lost(why) => {
                assert!(
                    why.contains("config") && why.contains("No such file"),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
        // Back with the same files: the same fingerprint as before.
        std::fs::rename(tmp.path().join("old"), &config).unwrap();
        assert_eq!(s.scan(&b), swapped);

        // The certificate directory: lost, then a file changes.
        std::fs::remove_dir(&certs).unwrap();
        assert!(matches!(s.scan(&b).certs, Fingerprint::Lost(_)));
        std::fs::create_dir(&certs).unwrap();
        let empty = s.scan(&b).certs;
        std::fs::write(certs.join("key.pem"), "k").unwrap();
        assert_ne!(s.scan(&b).certs, empty);
    }
}
