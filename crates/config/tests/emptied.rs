//! The rule file watchers (the proxy's file source, the control plane's
//! config source) hold a change back by: an emptied file or directory
//! waits, a deleted file is applied.

use std::collections::BTreeMap;
use std::path::PathBuf;

use meshward_config::{Emptied, emptied};

fn counts(entries: &[(&str, usize)]) -> BTreeMap<String, usize> {
    entries.iter().map(|(f, n)| (f.to_string(), *n)).collect()
}

#[test]
fn an_emptied_file_or_directory_holds_the_change_and_a_deleted_file_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let f = |name: &str| root.join(name).display().to_string();
    let roots = [root.clone()];
    let before = counts(&[(&f("a.yaml"), 2), (&f("b.yaml"), 1), (&f("c.yaml"), 0)]);

    // a.yaml emptied: held, naming it and what it had.
    let now = counts(&[(&f("a.yaml"), 0), (&f("b.yaml"), 1), (&f("c.yaml"), 0)]);
    let held = emptied(&before, &now, &roots).expect("held");
    assert_eq!(
        held,
        Emptied {
            path: PathBuf::from(f("a.yaml")),
            documents: 2,
            directory: false,
        }
    );
    assert!(
        held.to_string()
            .contains("held 2 document(s) at the last load; taken for a file being written"),
        "{held}"
    );
    // a.yaml deleted: its resources go.
    let now = counts(&[(&f("b.yaml"), 1), (&f("c.yaml"), 0)]);
    assert_eq!(emptied(&before, &now, &roots), None);
    // A file that was empty, or a new empty one, changes nothing.
    let now = counts(&[(&f("a.yaml"), 2), (&f("b.yaml"), 1), (&f("d.yaml"), 0)]);
    assert_eq!(emptied(&before, &now, &roots), None);
    // The directory re-created with nothing in it yet: held.
    let held = emptied(&before, &BTreeMap::new(), &roots).expect("held");
    assert_eq!(
        held,
        Emptied {
            path: root,
            documents: 3,
            directory: true,
        }
    );
    assert!(
        held.to_string()
            .contains("taken for a directory being written")
    );
}
