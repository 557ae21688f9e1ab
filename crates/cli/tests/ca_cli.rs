//! End-to-end tests of `meshward ca init`, `meshward ca issue` and
//! `meshward cert inspect`, running the built binary on temporary
//! directories. Interop checks use the `openssl` tool and fail (never skip)
//! when it is missing.

mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};

const ID: &str = "spiffe://cluster.local/ns/default/sa/api";

fn meshward(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshward"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run meshward")
}

fn text(out: &Output) -> String {
    format!(
        "status: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(args: &[&str], cwd: &Path) -> String {
    ok_with_stderr(args, cwd).0
}

/// Runs a command that must succeed; its stdout and stderr.
fn ok_with_stderr(args: &[&str], cwd: &Path) -> (String, String) {
    let out = meshward(args, cwd);
    assert!(
        out.status.success(),
        "meshward {}: {}",
        args.join(" "),
        text(&out)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn fails(args: &[&str], cwd: &Path, code: i32) -> String {
    let out = meshward(args, cwd);
    assert_eq!(
        out.status.code(),
        Some(code),
        "meshward {}: {}",
        args.join(" "),
        text(&out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout)
}

fn openssl_ok(args: &[&str], cwd: &Path) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| {
            panic!("this test needs the `openssl` command-line tool (apt-get install openssl): {e}")
        });
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn inspect_json(file: &str, root: &str, cwd: &Path) -> serde_json::Value {
    let out = ok(&["cert", "inspect", file, "--root", root, "--json"], cwd);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"))
}

#[test]
fn init_issue_inspect_and_openssl_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out = ok(&["ca", "init", "--out", "cacerts"], dir);
    assert!(out.contains("root-key.pem"), "{out}");
    for f in [
        "ca-cert.pem",
        "ca-key.pem",
        "root-cert.pem",
        "cert-chain.pem",
        "root-key.pem",
    ] {
        assert!(dir.join("cacerts").join(f).is_file(), "{f} missing");
    }
    assert_eq!(mode(&dir.join("cacerts/ca-key.pem")), 0o600);
    assert_eq!(mode(&dir.join("cacerts/root-key.pem")), 0o600);
    openssl_ok(
        &[
            "verify",
            "-CAfile",
            "cacerts/root-cert.pem",
            "cacerts/ca-cert.pem",
        ],
        dir,
    );

    let out = ok(
        &[
            "ca", "issue", "--ca", "cacerts", "--id", ID, "--out", "api", "--ttl", "1h",
        ],
        dir,
    );
    assert!(out.contains(ID), "{out}");
    assert_eq!(mode(&dir.join("api/key.pem")), 0o600);
    let verified = openssl_ok(
        &[
            "verify",
            "-CAfile",
            "api/root-cert.pem",
            "-untrusted",
            "api/cert-chain.pem",
            "api/cert-chain.pem",
        ],
        dir,
    );
    assert!(verified.contains(": OK"), "{verified}");
    // The key matches the leaf.
    let key_pub = openssl_ok(&["pkey", "-in", "api/key.pem", "-pubout"], dir);
    let cert_pub = openssl_ok(
        &["x509", "-in", "api/cert-chain.pem", "-noout", "-pubkey"],
        dir,
    );
    assert_eq!(key_pub, cert_pub);

    let report = inspect_json("api/cert-chain.pem", "api/root-cert.pem", dir);
    let leaf = &report["certificates"][0];
    assert_eq!(leaf["spiffe_id"], ID);
    assert_eq!(leaf["key_type"], "ECDSA P-256");
    assert_eq!(leaf["is_ca"], false);
    let left = leaf["seconds_left"].as_i64().unwrap();
    assert!((3500..=3600).contains(&left), "{left}");
    assert_eq!(report["verification"]["status"], "valid");
    assert_eq!(report["verification"]["identity"], ID);
    assert_eq!(report["certificates"].as_array().unwrap().len(), 3);

    let human = ok(
        &[
            "cert",
            "inspect",
            "api/cert-chain.pem",
            "--root",
            "api/root-cert.pem",
        ],
        dir,
    );
    for needle in [
        "SPIFFE ID:  spiffe://cluster.local/ns/default/sa/api",
        "subject:",
        "issuer:",
        "serial:",
        "key type:   ECDSA P-256",
        "not before:",
        "not after:",
        "time left:",
        "chain verification: OK",
    ] {
        assert!(human.contains(needle), "missing {needle:?} in:\n{human}");
    }
    let unchecked = ok(&["cert", "inspect", "api/cert-chain.pem"], dir);
    assert!(unchecked.contains("not checked"), "{unchecked}");

    // The CA certificate itself verifies against the root, too.
    let ca_report = inspect_json("cacerts/ca-cert.pem", "cacerts/root-cert.pem", dir);
    assert_eq!(ca_report["verification"]["status"], "valid");
    assert_eq!(ca_report["certificates"][0]["is_ca"], true);
    assert_eq!(
        ca_report["certificates"][0]["spiffe_id"],
        "spiffe://cluster.local"
    );
}

#[test]
fn init_options_and_second_cluster_under_the_same_root() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(
        &[
            "ca",
            "init",
            "--out",
            "east",
            "--trust-domain",
            "mesh.example.org",
            "--org",
            "Acme",
            "--key-type",
            "rsa-2048",
            "--root-lifetime",
            "5y",
            "--lifetime",
            "90d",
        ],
        dir,
    );
    let report = inspect_json("east/ca-cert.pem", "east/root-cert.pem", dir);
    let ca = &report["certificates"][0];
    assert_eq!(ca["key_type"], "RSA 2048");
    assert!(ca["subject"].as_str().unwrap().contains("O=Acme"), "{ca}");
    let left = ca["seconds_left"].as_i64().unwrap();
    assert!((89 * 86_400..=90 * 86_400 + 600).contains(&left), "{left}");
    let root = inspect_json("east/root-cert.pem", "east/root-cert.pem", dir);
    let left = root["certificates"][0]["seconds_left"].as_i64().unwrap();
    assert!(
        (5 * 365 * 86_400 - 86_400..=5 * 365 * 86_400 + 600).contains(&left),
        "{left}"
    );

    // A second cluster: a new intermediate under the same root.
    ok(
        &[
            "ca",
            "init",
            "--root",
            "east",
            "--out",
            "west",
            "--trust-domain",
            "mesh.example.org",
            "--key-type",
            "ec-p384",
        ],
        dir,
    );
    assert!(
        !dir.join("west/root-key.pem").exists(),
        "the root key stays where it was"
    );
    assert_eq!(
        std::fs::read(dir.join("east/root-cert.pem")).unwrap(),
        std::fs::read(dir.join("west/root-cert.pem")).unwrap()
    );
    let east_id = "spiffe://mesh.example.org/ns/east/sa/api";
    let west_id = "spiffe://mesh.example.org/ns/west/sa/web";
    ok(
        &["ca", "issue", "--ca", "east", "--id", east_id, "--out", "e"],
        dir,
    );
    ok(
        &["ca", "issue", "--ca", "west", "--id", west_id, "--out", "w"],
        dir,
    );
    // Each cluster's workloads verify against the other cluster's root file.
    let r = inspect_json("e/cert-chain.pem", "west/root-cert.pem", dir);
    assert_eq!(r["verification"]["identity"], east_id);
    let r = inspect_json("w/cert-chain.pem", "east/root-cert.pem", dir);
    assert_eq!(r["verification"]["identity"], west_id);
    for d in ["e", "w"] {
        openssl_ok(
            &[
                "verify",
                "-CAfile",
                &format!("{d}/root-cert.pem"),
                "-untrusted",
                &format!("{d}/cert-chain.pem"),
                &format!("{d}/cert-chain.pem"),
            ],
            dir,
        );
    }
}

#[test]
fn errors_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(&["ca", "init", "--out", "cacerts"], dir);

    // Existing files are not overwritten.
    let err = fails(&["ca", "init", "--out", "cacerts"], dir, 2);
    assert!(err.contains("already exists"), "{err}");

    // Another trust domain than the CA's.
    let err = fails(
        &[
            "ca",
            "issue",
            "--ca",
            "cacerts",
            "--id",
            "spiffe://other.org/ns/a/sa/b",
            "--out",
            "x",
        ],
        dir,
        2,
    );
    assert!(err.contains("trust domain"), "{err}");
    assert!(!dir.join("x/key.pem").exists());

    // Not a workload identity; unknown key type; bad duration: argument errors.
    let err = fails(
        &[
            "ca",
            "issue",
            "--ca",
            "cacerts",
            "--id",
            "spiffe://cluster.local/x",
            "--out",
            "x",
        ],
        dir,
        2,
    );
    assert!(err.contains("/ns/NAMESPACE/sa/SERVICE_ACCOUNT"), "{err}");
    let err = fails(&["ca", "init", "--out", "y", "--key-type", "dsa"], dir, 2);
    assert!(err.contains("unknown key type"), "{err}");
    let err = fails(
        &["ca", "init", "--out", "y", "--lifetime", "2 weeks"],
        dir,
        2,
    );
    assert!(err.contains("invalid duration"), "{err}");

    // A broken CA directory names the file.
    std::fs::write(dir.join("cacerts/ca-key.pem"), "garbage").unwrap();
    let err = fails(
        &["ca", "issue", "--ca", "cacerts", "--id", ID, "--out", "x"],
        dir,
        2,
    );
    assert!(err.contains("ca-key.pem"), "{err}");

    // A root without its key.
    let err = fails(&["ca", "init", "--root", "nowhere", "--out", "z"], dir, 2);
    assert!(err.contains("root-cert.pem"), "{err}");

    // Verification against the wrong root fails with exit code 1.
    ok(&["ca", "init", "--out", "other"], dir);
    ok(&["ca", "init", "--out", "good", "--force"], dir);
    ok(
        &["ca", "issue", "--ca", "good", "--id", ID, "--out", "api"],
        dir,
    );
    let out = fails(
        &[
            "cert",
            "inspect",
            "api/cert-chain.pem",
            "--root",
            "other/root-cert.pem",
        ],
        dir,
        1,
    );
    assert!(out.contains("FAILED"), "{out}");
    assert!(out.contains("does not chain to a trusted root"), "{out}");

    // Not a certificate.
    let err = fails(&["cert", "inspect", "cacerts/ca-key.pem"], dir, 2);
    assert!(err.contains("ca-key.pem"), "{err}");
}

/// A plug-in CA made exactly as the operator's guide does it (root,
/// intermediate, chain; plain OpenSSL, so no spiffe://TRUST_DOMAIN URI SAN),
/// in `dir`. The guide's `-extfile <(printf ...)` becomes a file.
fn operator_openssl_ca(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    openssl_ok(
        &[
            "req",
            "-new",
            "-newkey",
            "rsa:4096",
            "-x509",
            "-sha256",
            "-days",
            "3650",
            "-nodes",
            "-subj",
            "/O=Company Inc./CN=Root CA",
            "-keyout",
            "root-key.pem",
            "-out",
            "root-cert.pem",
        ],
        dir,
    );
    openssl_ok(
        &[
            "req",
            "-new",
            "-newkey",
            "rsa:4096",
            "-sha256",
            "-nodes",
            "-subj",
            "/O=Company Inc./CN=Istio Intermediate CA",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-csr.pem",
        ],
        dir,
    );
    std::fs::write(
        dir.join("ca.ext"),
        "basicConstraints=CA:TRUE\nkeyUsage=critical,digitalSignature,keyCertSign,cRLSign",
    )
    .unwrap();
    openssl_ok(
        &[
            "x509",
            "-req",
            "-days",
            "730",
            "-sha256",
            "-CA",
            "root-cert.pem",
            "-CAkey",
            "root-key.pem",
            "-CAcreateserial",
            "-in",
            "ca-csr.pem",
            "-out",
            "ca-cert.pem",
            "-extfile",
            "ca.ext",
        ],
        dir,
    );
    let chain = std::fs::read_to_string(dir.join("ca-cert.pem")).unwrap()
        + &std::fs::read_to_string(dir.join("root-cert.pem")).unwrap();
    std::fs::write(dir.join("cert-chain.pem"), chain).unwrap();
    let text = openssl_ok(&["x509", "-in", "ca-cert.pem", "-noout", "-text"], dir);
    assert!(
        !text.contains("URI:"),
        "the guide's CA names no SPIFFE ID:\n{text}"
    );
}

/// The one line `ca issue` / `ca init --root` print when they take the
/// default trust domain; `file` is the certificate that names none.
fn assert_default_note(stderr: &str, file: &str) {
    let lines = support::own_lines(stderr);
    assert_eq!(lines.len(), 1, "one note expected:\n{stderr}");
    let note = lines[0];
    assert!(note.starts_with("note: "), "{note}");
    assert!(note.contains(file), "{note}");
    assert!(
        note.contains("mesh default trust domain cluster.local"),
        "{note}"
    );
    assert!(note.contains("--trust-domain"), "{note}");
}

#[test]
fn openssl_plug_in_ca_issues_in_the_mesh_default_trust_domain() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    operator_openssl_ca(&dir.join("cacerts"));

    // No --trust-domain: cluster.local, said on stderr.
    let (out, err) = ok_with_stderr(
        &["ca", "issue", "--ca", "cacerts", "--id", ID, "--out", "api"],
        dir,
    );
    assert!(out.contains(ID), "{out}");
    assert_default_note(&err, "cacerts/ca-cert.pem");
    let report = inspect_json("api/cert-chain.pem", "cacerts/root-cert.pem", dir);
    assert_eq!(report["verification"]["status"], "valid");
    assert_eq!(report["verification"]["identity"], ID);
    assert_eq!(report["certificates"][0]["spiffe_id"], ID);

    // --trust-domain overrides, silently.
    let other = "spiffe://example.org/ns/shop/sa/web";
    let (out, err) = ok_with_stderr(
        &[
            "ca",
            "issue",
            "--ca",
            "cacerts",
            "--trust-domain",
            "example.org",
            "--id",
            other,
            "--out",
            "web",
        ],
        dir,
    );
    assert!(out.contains(other), "{out}");
    assert_eq!(err, "");
    let report = inspect_json("web/cert-chain.pem", "cacerts/root-cert.pem", dir);
    assert_eq!(report["verification"]["identity"], other);

    // An --id outside the chosen trust domain is still refused.
    let err = fails(
        &[
            "ca", "issue", "--ca", "cacerts", "--id", other, "--out", "x",
        ],
        dir,
        2,
    );
    assert!(
        err.contains("this CA signs for \"cluster.local\" only"),
        "{err}"
    );
    assert!(!dir.join("x/key.pem").exists());
}

#[test]
fn init_under_an_openssl_root_uses_the_mesh_default_trust_domain() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    operator_openssl_ca(&dir.join("corp"));

    let (out, err) = ok_with_stderr(&["ca", "init", "--root", "corp", "--out", "east"], dir);
    assert!(out.contains("trust domain cluster.local"), "{out}");
    assert_default_note(&err, "corp/root-cert.pem");
    let report = inspect_json("east/ca-cert.pem", "corp/root-cert.pem", dir);
    assert_eq!(report["verification"]["status"], "valid");
    assert_eq!(
        report["certificates"][0]["spiffe_id"],
        "spiffe://cluster.local"
    );
    // The new intermediate names its trust domain: issuing from it is silent.
    let (_, err) = ok_with_stderr(
        &["ca", "issue", "--ca", "east", "--id", ID, "--out", "api"],
        dir,
    );
    assert_eq!(err, "");

    let (_, err) = ok_with_stderr(
        &[
            "ca",
            "init",
            "--root",
            "corp",
            "--out",
            "west",
            "--trust-domain",
            "example.org",
        ],
        dir,
    );
    assert_eq!(err, "");
    let report = inspect_json("west/ca-cert.pem", "corp/root-cert.pem", dir);
    assert_eq!(
        report["certificates"][0]["spiffe_id"],
        "spiffe://example.org"
    );
}

#[test]
fn init_under_a_meshward_root_keeps_its_trust_domain() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(
        &[
            "ca",
            "init",
            "--out",
            "east",
            "--trust-domain",
            "mesh.example.org",
        ],
        dir,
    );
    // No --trust-domain: the root's, not cluster.local.
    let (out, err) = ok_with_stderr(&["ca", "init", "--root", "east", "--out", "west"], dir);
    assert!(out.contains("trust domain mesh.example.org"), "{out}");
    assert_eq!(err, "");
    let report = inspect_json("west/ca-cert.pem", "east/root-cert.pem", dir);
    assert_eq!(
        report["certificates"][0]["spiffe_id"],
        "spiffe://mesh.example.org"
    );
    // One that contradicts the root is refused, naming the file.
    let err = fails(
        &[
            "ca",
            "init",
            "--root",
            "east",
            "--out",
            "north",
            "--trust-domain",
            "other.org",
        ],
        dir,
        2,
    );
    assert!(err.contains("east/root-cert.pem"), "{err}");
    assert!(err.contains("\"mesh.example.org\""), "{err}");
    assert!(!dir.join("north").exists());
}
