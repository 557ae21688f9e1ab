//! Interop with an independent implementation: OpenSSL verifies what
//! meshward issues, and CAs made by OpenSSL load as plug-in CAs.
//! These tests fail (never skip) when the `openssl` tool is missing.

mod common;

use std::path::Path;

use common::*;
use meshward_identity::ca::{CaLoadError, CaSettings, CertificateAuthority, TrustDomainSource};
use meshward_identity::keys::KeyType;

/// Issues a leaf with `ca`, writes `cert-chain.pem` (leaf first) and
/// `root-cert.pem` to `dir`, and has OpenSSL verify it for both TLS purposes.
fn issue_and_openssl_verify(ca: &CertificateAuthority, dir: &Path, strict: bool) {
    let who = workload("default", "api");
    let (_, issued) = issue(ca, &who);
    let out = dir.join("leaf");
    std::fs::create_dir_all(&out).unwrap();
    write(&out.join("cert-chain.pem"), issued.chain_pem());
    write(&out.join("root-cert.pem"), issued.root_pem());
    for purpose in ["sslserver", "sslclient"] {
        let mut args = vec!["verify"];
        if strict {
            // Strict mode also demands keyUsage in every CA certificate,
            // which `openssl req -x509` roots may lack.
            args.push("-x509_strict");
        }
        args.extend([
            "-purpose",
            purpose,
            "-CAfile",
            "root-cert.pem",
            "-untrusted",
            "cert-chain.pem",
            "cert-chain.pem",
        ]);
        let stdout = openssl_ok(&args, &out);
        assert!(stdout.contains(": OK"), "{stdout}");
    }
    let text = openssl_ok(&["x509", "-in", "cert-chain.pem", "-noout", "-text"], &out);
    assert!(text.contains(&format!("URI:{who}")), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
}

#[test]
fn openssl_verifies_leaves_from_meshward_cas() {
    for (root_kt, int_kt) in [
        (KeyType::EcP256, KeyType::EcP256),
        (KeyType::EcP384, KeyType::EcP384),
        (KeyType::Rsa2048, KeyType::Rsa2048),
        (KeyType::Rsa3072, KeyType::EcP256),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (_root, m) = material(TD, root_kt, int_kt);
        m.write_dir(&dir.path().join("cacerts"), false).unwrap();
        let ca = CertificateAuthority::load_dir(&dir.path().join("cacerts"), CaSettings::default())
            .unwrap();
        // OpenSSL also accepts the CA chain itself.
        openssl_ok(
            &[
                "verify",
                "-x509_strict",
                "-CAfile",
                "cacerts/root-cert.pem",
                "cacerts/ca-cert.pem",
            ],
            dir.path(),
        );
        issue_and_openssl_verify(&ca, dir.path(), true);
    }
}

#[test]
fn openssl_verifies_leaves_from_a_self_signed_root_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = root(TD, KeyType::EcP256)
        .into_authority(CaSettings::default())
        .unwrap();
    issue_and_openssl_verify(&ca, dir.path(), true);
}

const ROOT_CNF: &str = "\
[req]
distinguished_name = dn
x509_extensions = v3_root
prompt = no
[dn]
O = OpenSSL Test Org
CN = OpenSSL Test Root
[v3_root]
basicConstraints = critical,CA:true
subjectKeyIdentifier = hash
";

const ROOT_CNF_KU: &str = "keyUsage = critical,keyCertSign,cRLSign\n";

fn int_ext(key_usage: &str) -> String {
    format!(
        "basicConstraints = critical,CA:true,pathlen:0\n\
         keyUsage = critical,{key_usage}\n\
         subjectKeyIdentifier = hash\n\
         authorityKeyIdentifier = keyid:always\n"
    )
}

/// Key generation commands producing the traditional encodings operators'
/// CAs use (SEC1 `EC PRIVATE KEY`, PKCS#1 `RSA PRIVATE KEY`).
fn genkey(kind: &str, out: &str, dir: &Path) {
    match kind {
        "ec" => openssl_ok(
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                out,
            ],
            dir,
        ),
        "ec384" => openssl_ok(
            &[
                "ecparam",
                "-name",
                "secp384r1",
                "-genkey",
                "-noout",
                "-out",
                out,
            ],
            dir,
        ),
        "rsa" => openssl_ok(&["genrsa", "-traditional", "-out", out, "2048"], dir),
        "rsa1024" => openssl_ok(&["genrsa", "-traditional", "-out", out, "1024"], dir),
        other => panic!("unknown key kind {other}"),
    };
}

/// Makes a cacerts directory with OpenSSL only.
fn openssl_cacerts(dir: &Path, root_kind: &str, int_kind: &str, root_ku: bool, int_ku: &str) {
    let cnf = if root_ku {
        format!("{ROOT_CNF}{ROOT_CNF_KU}")
    } else {
        ROOT_CNF.to_owned()
    };
    write(&dir.join("root.cnf"), cnf);
    write(&dir.join("int.ext"), int_ext(int_ku));
    genkey(root_kind, "root-key.pem", dir);
    openssl_ok(
        &[
            "req",
            "-x509",
            "-new",
            "-config",
            "root.cnf",
            "-key",
            "root-key.pem",
            "-sha256",
            "-days",
            "3650",
            "-out",
            "root-cert.pem",
        ],
        dir,
    );
    genkey(int_kind, "ca-key.pem", dir);
    openssl_ok(
        &[
            "req",
            "-new",
            "-key",
            "ca-key.pem",
            "-subj",
            "/O=OpenSSL Test Org/CN=OpenSSL Test Intermediate",
            "-out",
            "ca.csr",
        ],
        dir,
    );
    openssl_ok(
        &[
            "x509",
            "-req",
            "-in",
            "ca.csr",
            "-CA",
            "root-cert.pem",
            "-CAkey",
            "root-key.pem",
            "-CAcreateserial",
            "-days",
            "730",
            "-sha256",
            "-extfile",
            "int.ext",
            "-out",
            "ca-cert.pem",
        ],
        dir,
    );
    let chain = std::fs::read_to_string(dir.join("ca-cert.pem")).unwrap()
        + &std::fs::read_to_string(dir.join("root-cert.pem")).unwrap();
    write(&dir.join("cert-chain.pem"), chain);
}

fn settings() -> CaSettings {
    // OpenSSL-made CAs carry no spiffe://TD URI SAN: configure the trust domain.
    CaSettings {
        trust_domain: Some(td(TD)),
        ..CaSettings::default()
    }
}

#[test]
fn openssl_made_cas_load_as_plug_in_cas() {
    for (root_kind, int_kind, root_ku) in [
        ("ec", "ec", true),
        ("rsa", "rsa", true),
        ("rsa", "ec", false),
        ("ec384", "ec384", false),
    ] {
        let dir = tempfile::tempdir().unwrap();
        openssl_cacerts(
            dir.path(),
            root_kind,
            int_kind,
            root_ku,
            "keyCertSign,cRLSign,digitalSignature",
        );
        let key_pem = std::fs::read_to_string(dir.path().join("ca-key.pem")).unwrap();
        assert!(
            key_pem.contains("BEGIN EC PRIVATE KEY") || key_pem.contains("BEGIN RSA PRIVATE KEY"),
            "traditional key encoding expected: {}",
            key_pem.lines().next().unwrap_or_default()
        );
        let ca = CertificateAuthority::load_dir(dir.path(), settings())
            .unwrap_or_else(|e| panic!("{root_kind}/{int_kind}: {e}"));
        issue_and_openssl_verify(&ca, dir.path(), root_ku);
    }
}

#[test]
fn openssl_made_ca_without_a_trust_domain_signs_for_cluster_local() {
    // As operators make them (Istio's docs, `istio/tools/certs`): no
    // spiffe://TD URI SAN anywhere. Nothing configured: Istio's default.
    let dir = tempfile::tempdir().unwrap();
    openssl_cacerts(dir.path(), "rsa", "ec", false, "keyCertSign,cRLSign");
    let ca = CertificateAuthority::load_dir(dir.path(), CaSettings::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ca.trust_domain().as_str(), "cluster.local");
    assert_eq!(
        ca.chosen_trust_domain().source(),
        TrustDomainSource::IstioDefault
    );
    // `workload` is in `TD`, cluster.local; OpenSSL checks the leaf's URI SAN.
    issue_and_openssl_verify(&ca, dir.path(), false);
}

#[test]
fn openssl_made_ca_errors() {
    // Intermediate without keyCertSign.
    let dir = tempfile::tempdir().unwrap();
    openssl_cacerts(dir.path(), "ec", "ec", true, "digitalSignature");
    let err = CertificateAuthority::load_dir(dir.path(), settings()).unwrap_err();
    assert!(
        matches!(err, CaLoadError::MissingKeyCertSign { .. }),
        "{err}"
    );

    // RSA 1024 is too small.
    let dir = tempfile::tempdir().unwrap();
    openssl_cacerts(dir.path(), "rsa", "rsa1024", true, "keyCertSign,cRLSign");
    let err = CertificateAuthority::load_dir(dir.path(), settings()).unwrap_err();
    assert!(matches!(err, CaLoadError::UnsupportedKey { .. }), "{err}");
    assert!(err.to_string().contains("ca-cert.pem"), "{err}");

    // Key swapped for another key of the same type.
    let dir = tempfile::tempdir().unwrap();
    openssl_cacerts(dir.path(), "ec", "ec", true, "keyCertSign,cRLSign");
    genkey("ec", "other-key.pem", dir.path());
    std::fs::rename(
        dir.path().join("other-key.pem"),
        dir.path().join("ca-key.pem"),
    )
    .unwrap();
    let err = CertificateAuthority::load_dir(dir.path(), settings()).unwrap_err();
    assert!(matches!(err, CaLoadError::KeyMismatch { .. }), "{err}");
}
