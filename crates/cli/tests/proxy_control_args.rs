//! `meshward proxy`'s two modes on the command line: `--control` (with
//! `--token-file` and `--root-cert`) or `--config` with `--certs`, one of
//! them, never both; bad control-mode input stops the proxy at start with
//! what is wrong.

use std::process::Command;

use base64::Engine as _;

/// Runs `meshward proxy ARGS`, which must fail: its stderr.
fn refused(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_meshward"))
        .arg("proxy")
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn one_of_the_two_modes_is_required_and_they_exclude_each_other() {
    let e = refused(&["-w", "production/orders"]);
    assert!(e.contains("--control") && e.contains("--config"), "{e}");

    let e = refused(&["-w", "production/orders", "--control", "127.0.0.1:15012"]);
    assert!(
        e.contains("--token-file") && e.contains("--root-cert"),
        "{e}"
    );

    let e = refused(&[
        "-w",
        "production/orders",
        "--control",
        "127.0.0.1:15012",
        "--token-file",
        "t",
        "--root-cert",
        "r",
        "--certs",
        "d",
    ]);
    assert!(e.contains("cannot be used with"), "{e}");

    let e = refused(&[
        "-w",
        "production/orders",
        "--config",
        "c",
        "--token-file",
        "t",
        "--certs",
        "d",
    ]);
    assert!(e.contains("cannot be used with"), "{e}");

    let e = refused(&["-w", "production/orders", "--config", "c"]);
    assert!(e.contains("--certs"), "{e}");
}

#[test]
fn a_token_of_another_namespace_stops_the_proxy_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let token = format!(
        "{}.{}.{}",
        b("{}"),
        b(r#"{"spiffe":"spiffe://cluster.local/ns/staging/sa/orders"}"#),
        b("sig")
    );
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();
    let root = dir.path().join("root-cert.pem");
    std::fs::write(&root, "").unwrap();
    let e = refused(&[
        "-w",
        "production/orders",
        "--control",
        "127.0.0.1:15012",
        "--token-file",
        token_file.to_str().unwrap(),
        "--root-cert",
        root.to_str().unwrap(),
    ]);
    assert!(
        e.contains("namespace \"staging\"") && e.contains("\"production/orders\""),
        "{e}"
    );
    assert!(!e.contains("c2ln"), "the token is never printed: {e}");
}
