//! The watched source: how changes are picked up, however the files are
//! replaced, and within which bound.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshward_control::Metrics;
use meshward_control::snapshot::Snapshot;
use meshward_control::source::{ConfigSource, RESCAN};
use meshward_test_support::mesh;
use tokio::sync::watch;

/// The bound a change must be seen within (the rescan interval, plus
/// margin for a loaded machine).
const BOUND: Duration = Duration::from_millis(1500);

fn base() -> String {
    [
        mesh::WorkloadEntry::new("ns-a", "web").yaml(),
        mesh::allow_from(
            "ns-a",
            "web-allow",
            "web",
            "cluster.local/ns/ns-a/sa/api",
            None,
        ),
    ]
    .concat()
}

fn changed() -> String {
    base() + &mesh::authorization_policy("ns-a", "deny-all", "  action: DENY\n  rules: [{}]\n")
}

/// Waits for the next published snapshot, at most `limit`.
async fn next(rx: &mut watch::Receiver<Arc<Snapshot>>, limit: Duration) -> Option<Arc<Snapshot>> {
    tokio::time::timeout(limit, rx.changed()).await.ok()?.ok()?;
    Some(rx.borrow_and_update().clone())
}

fn start(
    paths: &[&Path],
    metrics: &Arc<Metrics>,
) -> (ConfigSource, watch::Receiver<Arc<Snapshot>>) {
    ConfigSource::start(
        paths.iter().map(|p| p.to_path_buf()).collect(),
        None,
        metrics.clone(),
    )
    .unwrap()
}

#[tokio::test]
async fn a_file_replaced_by_rename_is_picked_up_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mesh.yaml");
    std::fs::write(&file, base()).unwrap();
    let metrics = Arc::new(Metrics::new());
    let (_source, mut rx) = start(&[&file], &metrics);
    let before = rx.borrow().version().to_string();
    // An editor's atomic save: write a temporary file, rename it over.
    let tmp = dir.path().join(".mesh.yaml.tmp");
    std::fs::write(&tmp, changed()).unwrap();
    let t = Instant::now();
    std::fs::rename(&tmp, &file).unwrap();
    let snap = next(&mut rx, BOUND)
        .await
        .expect("the change within the bound");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
    assert_ne!(snap.version(), before);
    assert_eq!(snap.config().authorization_policies.len(), 2);
    assert_eq!(metrics.config_accepted.get(), 2);
}

#[tokio::test]
async fn a_directory_replaced_whole_is_picked_up_and_watched_again() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("config");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("a.yaml"), base()).unwrap();
    let metrics = Arc::new(Metrics::new());
    let (_source, mut rx) = start(&[&dir], &metrics);
    let before = rx.borrow().version().to_string();
    // The watched directory goes away; a new one takes its name (as a
    // ConfigMap volume's `..data` swap or `mv new config` does).
    let fresh = parent.path().join("fresh");
    std::fs::create_dir(&fresh).unwrap();
    std::fs::write(fresh.join("a.yaml"), changed()).unwrap();
    std::fs::rename(&dir, parent.path().join("old")).unwrap();
    std::fs::rename(&fresh, &dir).unwrap();
    let t = Instant::now();
    let snap = next(&mut rx, RESCAN + BOUND)
        .await
        .expect("the new directory read");
    assert!(
        t.elapsed() < RESCAN + Duration::from_millis(500),
        "took {:?}",
        t.elapsed()
    );
    assert_ne!(snap.version(), before);
    assert_eq!(snap.config().authorization_policies.len(), 2);
    // The new directory is watched: later changes in it are seen at once.
    let t = Instant::now();
    std::fs::write(
        dir.join("b.yaml"),
        mesh::peer_authentication("ns-a", "strict", "STRICT"),
    )
    .unwrap();
    let snap = next(&mut rx, BOUND)
        .await
        .expect("a change in the new directory");
    assert!(t.elapsed() < RESCAN / 2, "took {:?}", t.elapsed());
    assert_eq!(snap.config().peer_authentications.len(), 1);
}

#[tokio::test]
async fn a_half_written_file_is_refused_and_its_completion_accepted() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), base()).unwrap();
    let metrics = Arc::new(Metrics::new());
    let (_source, mut rx) = start(&[dir.path()], &metrics);
    let before = rx.borrow().version().to_string();
    let full = changed();
    // Cut inside the last document's flow mapping: not YAML.
    let cut = full.rfind("rules: [{").unwrap() + "rules: [{".len();
    std::fs::write(dir.path().join("a.yaml"), &full[..cut]).unwrap();
    meshward_test_support::wait::eventually("the half-written file refused", || async {
        (metrics.config_rejected.get() == 1).then_some(())
    })
    .await;
    assert_eq!(rx.borrow().version(), before);
    std::fs::write(dir.path().join("a.yaml"), &full).unwrap();
    let snap = next(&mut rx, BOUND).await.expect("the completed file");
    assert_eq!(snap.config().authorization_policies.len(), 2);
    assert_eq!(metrics.config_rejected.get(), 1);
}

#[tokio::test]
async fn a_deleted_file_removes_its_resources_and_an_emptied_one_does_not() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), base()).unwrap();
    std::fs::write(
        dir.path().join("b.yaml"),
        mesh::peer_authentication("ns-a", "strict", "STRICT"),
    )
    .unwrap();
    let metrics = Arc::new(Metrics::new());
    let (_source, mut rx) = start(&[dir.path()], &metrics);
    std::fs::write(dir.path().join("b.yaml"), "").unwrap();
    // Held: nothing published, nothing counted as refused. The deletion
    // of the same file is published.
    assert!(
        next(&mut rx, RESCAN + Duration::from_millis(300))
            .await
            .is_none()
    );
    assert_eq!(metrics.config_rejected.get(), 0);
    std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
    let snap = next(&mut rx, BOUND).await.expect("the deletion");
    assert!(snap.config().peer_authentications.is_empty());
    // A comment at the end: no document or origin changed, no new version.
    std::fs::write(dir.path().join("a.yaml"), format!("{}# reviewed\n", base())).unwrap();
    assert!(
        next(&mut rx, RESCAN + Duration::from_millis(300))
            .await
            .is_none()
    );
}
