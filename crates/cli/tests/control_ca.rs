//! `meshward control` as a real process, `meshward control token`, a CSR
//! made by the openssl CLI, and the issued chain verified by openssl. The
//! openssl checks fail (never skip) when the tool is missing.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};

use meshward_identity::credentials::CurrentCredentials;
use meshward_identity::{
    CredentialResolver, SpiffeId, SpiffeServerVerifier, SvidVerifier, TrustBundle, TrustDomains,
};
use meshward_proto::ca::IstioCertificateRequest;
use meshward_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use meshward_test_support::process::Process;
use meshward_test_support::wait::eventually;

const API: &str = "spiffe://cluster.local/ns/default/sa/api";

fn meshward(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshward"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run meshward")
}

fn openssl(args: &[&str], cwd: &Path) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("the openssl CLI is needed (scripts/dev.sh setup installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "openssl {args:?}: {text}");
    text
}

/// Starts `meshward control` with `ca_flags` and returns it with its gRPC address.
async fn control(ca_flags: &[&str], cwd: &Path) -> (Process, SocketAddr) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshward"));
    cmd.args([
        "control",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ])
    .args(ca_flags)
    .current_dir(cwd);
    let mut p = Process::spawn_captured("control", cmd).unwrap();
    let addr = eventually("control prints its gRPC address", || {
        let alive = p.check_alive();
        let stderr = p.stderr();
        async move {
            if let Err(e) = alive {
                panic!("control exited: {e}\n{stderr}");
            }
            stderr.lines().find_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                v.get("grpc")?.as_str()?.parse().ok()
            })
        }
    })
    .await;
    (p, addr)
}

async fn client(
    addr: SocketAddr,
    root_file: &Path,
) -> IstioCertificateServiceClient<tonic::transport::Channel> {
    let bundle = TrustBundle::from_pem_file(root_file).unwrap();
    let verifier = SpiffeServerVerifier::expecting(
        SvidVerifier::new(bundle, TrustDomains::any()),
        [SpiffeId::parse("spiffe://cluster.local/ns/istio-system/sa/istiod").unwrap()],
    );
    let (_tx, rx) = tokio::sync::watch::channel::<CurrentCredentials>(None);
    let config = meshward_identity::client_config(verifier, CredentialResolver::new(rx)).unwrap();
    let channel = meshward_control::tls::connect(&addr.to_string(), config)
        .await
        .unwrap();
    IstioCertificateServiceClient::new(channel)
}

fn with_token(csr: String, token: &str) -> tonic::Request<IstioCertificateRequest> {
    let mut r = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: 3600,
        metadata: None,
    });
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn token(ca_flags: &[&str], sa: &str, cwd: &Path) -> String {
    let mut args = vec![
        "control",
        "token",
        "--namespace",
        "default",
        "--service-account",
        sa,
    ];
    args.extend_from_slice(ca_flags);
    let out = meshward(&args, cwd);
    assert!(
        out.status.success(),
        "control token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// An openssl-made key and CSR asking for `uri`; returns the CSR PEM.
fn openssl_csr(uri: &str, cwd: &Path) -> String {
    openssl(
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "key.pem",
            "-subj",
            "/",
            "-addext",
            &format!("subjectAltName=URI:{uri}"),
            "-out",
            "csr.pem",
        ],
        cwd,
    );
    std::fs::read_to_string(cwd.join("csr.pem")).unwrap()
}

/// Issues a certificate for `api` through the running control plane and
/// checks it with openssl: the chain verifies to the returned roots, the
/// only SAN is the token's identity, the key is the CSR's.
async fn issue_and_verify(addr: SocketAddr, ca_flags: &[&str], root_file: &Path, dir: &Path) {
    let token = token(ca_flags, "api", dir);
    let csr = openssl_csr(API, dir);
    let mut c = client(addr, root_file).await;
    let resp = c
        .create_certificate(with_token(csr, &token))
        .await
        .unwrap()
        .into_inner();
    std::fs::write(dir.join("leaf.pem"), &resp.cert_chain[0]).unwrap();
    std::fs::write(dir.join("untrusted.pem"), resp.cert_chain[1..].concat()).unwrap();
    std::fs::write(
        dir.join("roots.pem"),
        resp.root_cert.unwrap().ca_cert.concat(),
    )
    .unwrap();
    let mut verify = vec!["verify", "-CAfile", "roots.pem"];
    if resp.cert_chain.len() > 1 {
        verify.extend(["-untrusted", "untrusted.pem"]);
    }
    verify.push("leaf.pem");
    assert!(openssl(&verify, dir).contains("leaf.pem: OK"));
    let san = openssl(
        &[
            "x509",
            "-in",
            "leaf.pem",
            "-noout",
            "-ext",
            "subjectAltName",
        ],
        dir,
    );
    let names: Vec<&str> = san
        .lines()
        .skip(1)
        .flat_map(|l| l.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(names, [format!("URI:{API}")], "{san}");
    assert_eq!(
        openssl(&["x509", "-in", "leaf.pem", "-noout", "-pubkey"], dir),
        openssl(&["pkey", "-in", "key.pem", "-pubout"], dir)
    );

    // The same token cannot obtain another identity.
    let other = openssl_csr("spiffe://cluster.local/ns/default/sa/admin", dir);
    let status = c
        .create_certificate(with_token(other, &token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status
            .message()
            .contains("but the caller proved spiffe://cluster.local/ns/default/sa/api"),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_signed_control_plane_issues_what_openssl_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cp, addr) = control(&[], dir.path()).await;
    let root = dir.path().join("meshward-control/root-cert.pem");
    issue_and_verify(addr, &[], &root, dir.path()).await;

    // The server certificate: verified by openssl against the root, for
    // the IP it listens on.
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-CAfile",
            root.to_str().unwrap(),
            "-verify_ip",
            "127.0.0.1",
            "-verify_return_error",
            "-alpn",
            "h2",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    assert!(text.contains("ALPN protocol: h2"), "{text}");

    // A restart keeps the root: the old root file still verifies new leaves.
    let before = std::fs::read(&root).unwrap();
    cp.terminate();
    let (_cp, addr) = control(&[], dir.path()).await;
    assert_eq!(std::fs::read(&root).unwrap(), before);
    issue_and_verify(addr, &[], &root, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_ca_from_ca_init_issues_what_openssl_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let out = meshward(&["ca", "init", "--out", "cacerts"], dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let flags = ["--ca", "cacerts"];
    let (_cp, addr) = control(&flags, dir.path()).await;
    let root = dir.path().join("cacerts/root-cert.pem");
    issue_and_verify(addr, &flags, &root, dir.path()).await;
}

#[test]
fn bad_ca_and_flags_exit_2_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("empty")).unwrap();
    let out = meshward(
        &["control", "--ca", "empty", "--listen", "127.0.0.1:0"],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("empty/ca-cert.pem"), "{err}");

    let out = meshward(
        &["control", "token", "-n", "default", "-s", "api"],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no CA here"));

    let out = meshward(&["control", "--identity", "nope"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NAMESPACE/SERVICE_ACCOUNT"));

    let out = meshward(
        &[
            "control", "token", "-n", "default", "-s", "api", "--ttl", "48h", "--ca", "empty",
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at most 24h"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_within_30_days_is_warned_and_exported() {
    let dir = tempfile::tempdir().unwrap();
    let out = meshward(
        &[
            "ca",
            "init",
            "--out",
            "cacerts",
            "--root-lifetime",
            "20d",
            "--lifetime",
            "10d",
        ],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (cp, _addr) = control(&["--ca", "cacerts"], dir.path()).await;
    let stderr = cp.stderr();
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("\"WARN\"") && l.contains("expires within 30 days"))
        .collect();
    assert_eq!(warnings.len(), 2, "root and signing CA: {stderr}");
    assert!(warnings[0].contains("rotate the root"), "{stderr}");
    assert!(warnings[1].contains("signing CA certificate"), "{stderr}");
}
