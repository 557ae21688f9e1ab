//! PEM helpers: decode certificates and keys with `rustls-pki-types`, encode
//! DER as PEM, and read/write the files of a `cacerts` directory (private keys
//! with mode 0600).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A PEM or file problem, with the file it concerns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PemError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: cannot write: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not valid PEM: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("{}: contains no {what}", path.display())]
    Missing { path: PathBuf, what: &'static str },
    #[error("{}: already exists (refusing to overwrite)", path.display())]
    Exists { path: PathBuf },
}

/// Decodes every `CERTIFICATE` block of `pem` (other blocks are skipped).
/// `origin` names the source in errors.
pub fn certs_from_pem(pem: &[u8], origin: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::Invalid {
            path: origin.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PemError::Missing {
            path: origin.to_owned(),
            what: "CERTIFICATE block",
        });
    }
    Ok(certs)
}

/// Decodes the first private key block (`PRIVATE KEY`, `RSA PRIVATE KEY`, `EC PRIVATE KEY`).
pub fn key_from_pem(pem: &[u8], origin: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => PemError::Missing {
            path: origin.to_owned(),
            what: "private key block",
        },
        other => PemError::Invalid {
            path: origin.to_owned(),
            reason: other.to_string(),
        },
    })
}

/// Reads a file.
pub fn read_file(path: &Path) -> Result<Vec<u8>, PemError> {
    std::fs::read(path).map_err(|source| PemError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads and decodes all certificates of a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    certs_from_pem(&read_file(path)?, path)
}

/// Encodes DER as one PEM block with the given label (64-column base64).
pub fn encode(label: &str, der: &[u8]) -> String {
    let b64 = base64(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// Encodes certificates as consecutive `CERTIFICATE` blocks.
pub fn encode_certs<'a>(certs: impl IntoIterator<Item = &'a CertificateDer<'a>>) -> String {
    certs
        .into_iter()
        .map(|c| encode("CERTIFICATE", c))
        .collect()
}

/// How a file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// Readable by everyone (certificates): mode 0644.
    Public,
    /// Owner only (private keys): mode 0600, set at creation, never widened.
    Secret,
}

/// Writes `contents` to `path`, refusing to overwrite unless `overwrite`.
/// Secret files are created with mode 0600 (and re-restricted if they existed).
pub fn write_file(
    path: &Path,
    contents: &[u8],
    kind: FileKind,
    overwrite: bool,
) -> Result<(), PemError> {
    let werr = |source| PemError::Write {
        path: path.to_owned(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true);
    if overwrite {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(match kind {
            FileKind::Public => 0o644,
            FileKind::Secret => 0o600,
        });
    }
    let mut file = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            PemError::Exists {
                path: path.to_owned(),
            }
        } else {
            werr(e)
        }
    })?;
    #[cfg(unix)]
    if kind == FileKind::Secret {
        // `mode` only applies to newly created files: an existing file keeps
        // its permissions, so restrict it before writing the key into it.
        use std::os::unix::fs::PermissionsExt as _;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(werr)?;
    }
    file.write_all(contents).map_err(werr)?;
    file.sync_all().map_err(werr)
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let idx = |shift: u32| char::from(ALPHABET[((n >> shift) & 63) as usize]);
        out.push(idx(18));
        out.push(idx(12));
        out.push(if chunk.len() > 1 { idx(6) } else { '=' });
        out.push(if chunk.len() > 2 { idx(0) } else { '=' });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want);
        }
    }

    #[test]
    fn pem_round_trip() {
        let der: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let pem = encode("CERTIFICATE", &der);
        let back = certs_from_pem(pem.as_bytes(), Path::new("x")).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].as_ref(), der.as_slice());
    }

    #[test]
    fn missing_and_garbage() {
        let p = Path::new("f.pem");
        assert!(matches!(
            certs_from_pem(b"hello", p),
            Err(PemError::Missing { .. })
        ));
        assert!(matches!(
            certs_from_pem(
                b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
                p
            ),
            Err(PemError::Invalid { .. })
        ));
        assert!(matches!(
            key_from_pem(b"", p),
            Err(PemError::Missing { .. })
        ));
    }
}
