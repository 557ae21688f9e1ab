//! DestinationRule TLS towards services outside the mesh (`SIMPLE`,
//! `MUTUAL`): the client configs built from the local files a
//! DestinationRule names (`caCertificates`, `clientCertificate`,
//! `privateKey`), and the words for a TLS failure with an upstream.
//!
//! The files are checked before they are used: each certificate parses,
//! is X.509 version 3 and is within its validity period, and the private
//! key is of a kind rustls can sign with and matches the certificate. A
//! problem is reported as a problem of that local file
//! (`DestinationRule ns/name: clientCertificate FILE: certificate expired
//! at ...`), not as whatever the server answers to a bad certificate.
//!
//! Their bytes come from the source (`Feed::files`: the file source reads
//! them and publishes them when they change); [`DrFiles::refresh`] builds
//! again what changed, like the workload's own certificates: a change that
//! cannot be used is refused (WARN, counted in
//! `meshward_config_rejected_total`) and the last good config is kept. A
//! DestinationRule whose files were never usable has no config: its
//! requests fail with 503 naming the file and the reason, and the proxy
//! tries the published files again at most every [`RETRY_UNUSABLE`] (a
//! certificate that was not yet valid becomes usable without any file
//! changing).
//!
//! A new config is used by new connections only. Connections made with the
//! previous certificate finish what they carry, but the pool key names the
//! config, so they are not handed to later requests and close once idle.
//! (Envoy swaps an SDS secret for new handshakes too and keeps reusing
//! pooled connections; meshward does not reuse them, so every request
//! after a rotation presents the new certificate.)

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshward_config::model::networking::{ClientTls, TlsMode};
use rustls::{AlertDescription, ClientConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer as _;
use x509_parser::x509::X509Version;

use crate::snapshot::{Service, Snapshot};
use crate::source::LocalFiles;
use crate::telemetry::Metrics;

/// How often the files of a DestinationRule without a usable config are
/// tried again when a request needs them.
pub const RETRY_UNUSABLE: Duration = Duration::from_secs(5);

/// A local file of a DestinationRule that cannot be used: which field
/// names it, its path, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}{}: {reason}", if path.is_empty() { String::new() } else { format!(" {path}") })]
pub struct FileError {
    /// `caCertificates`, `clientCertificate` or `privateKey`.
    pub field: &'static str,
    pub path: String,
    pub reason: String,
}

impl FileError {
    fn new(field: &'static str, path: &str, reason: impl Into<String>) -> FileError {
        FileError {
            field,
            path: path.to_string(),
            reason: reason.into(),
        }
    }
}

/// The facts of a loaded client certificate (its leaf).
#[derive(Debug, Clone)]
pub struct CertFacts {
    pub subject: String,
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// A usable client config and where it came from.
#[derive(Debug)]
pub struct Loaded {
    pub config: Arc<ClientConfig>,
    /// `DestinationRule ns/name`.
    source: String,
    /// `MUTUAL`: the certificate presented, and its file.
    cert: Option<(CertFacts, String)>,
    loaded_at: OffsetDateTime,
}

impl Loaded {
    /// The certificate this config presents, for a failure's reason:
    /// `DestinationRule ns/name: clientCertificate FILE (subject ...,
    /// valid until ...)`, saying so when it has expired since it was
    /// loaded.
    fn presented(&self, now: OffsetDateTime) -> String {
        match &self.cert {
            None => format!("{}: no client certificate (SIMPLE)", self.source),
            Some((facts, path)) => {
                let expired = if now > facts.not_after {
                    "; it has expired"
                } else {
                    ""
                };
                format!(
                    "{}: clientCertificate {path} (subject \"{}\", valid until {}{expired})",
                    self.source,
                    facts.subject,
                    rfc3339(facts.not_after)
                )
            }
        }
    }
}

/// The files of one set of DestinationRule TLS settings: what a client
/// config is built from. `SIMPLE` ignores the client certificate fields,
/// as Istio does.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Files {
    mutual: bool,
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    /// `subjectAltNames`: when set, the server certificate must carry one
    /// of them (a DNS or URI SAN), as Envoy's SAN matchers that Istio
    /// generates from them require; else it must be valid for the SNI.
    sans: Vec<String>,
}

impl Files {
    fn of(tls: &ClientTls) -> Option<Files> {
        let mutual = match tls.mode {
            TlsMode::Mutual => true,
            TlsMode::Simple => false,
            TlsMode::Disable | TlsMode::IstioMutual => return None,
        };
        Some(Files {
            mutual,
            ca: tls.ca_certificates.clone(),
            cert: tls.client_certificate.clone().filter(|_| mutual),
            key: tls.private_key.clone().filter(|_| mutual),
            sans: tls.subject_alt_names.clone(),
        })
    }

    /// The paths named, with their field.
    fn paths(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("caCertificates", &self.ca),
            ("clientCertificate", &self.cert),
            ("privateKey", &self.key),
        ]
        .into_iter()
        .filter_map(|(field, p)| p.as_deref().map(|p| (field, p)))
    }
}

/// The bytes of each named file, or why it could not be read.
struct Contents(Vec<(&'static str, FileContents)>);

/// A file's bytes, or why it could not be read.
type FileContents = Result<Arc<[u8]>, String>;

impl Contents {
    /// The contents of `files` as the source last published them.
    fn of(files: &Files, published: &LocalFiles) -> Contents {
        Contents(
            files
                .paths()
                .map(|(field, p)| {
                    let c = published.get(p).cloned().unwrap_or_else(|| {
                        Err("not provided by the configuration source".to_string())
                    });
                    (field, c)
                })
                .collect(),
        )
    }

    /// A fingerprint of what was read, to tell a real change from an
    /// event that left the files as they were (another file of the
    /// directory, a symlink swap to the same content).
    fn fingerprint(&self) -> u64 {
        let mut h = DefaultHasher::new();
        for (field, c) in &self.0 {
            field.hash(&mut h);
            match c {
                Ok(bytes) => (0u8, &bytes[..]).hash(&mut h),
                Err(e) => (1u8, e).hash(&mut h),
            }
        }
        h.finish()
    }

    /// The bytes of the file of `field` (at `path`).
    fn bytes(&self, field: &'static str, path: &str) -> Result<&[u8], FileError> {
        match self.0.iter().find(|(f, _)| *f == field) {
            Some((_, Ok(b))) => Ok(b),
            Some((_, Err(e))) => Err(FileError::new(field, path, format!("cannot read: {e}"))),
            None => Err(FileError::new(field, path, "is not set")),
        }
    }
}

/// Builds the client config of `files` from `contents`, checking the
/// local certificate and key at `now`.
fn build(
    files: &Files,
    contents: &Contents,
    now: OffsetDateTime,
) -> Result<(ClientConfig, Option<CertFacts>), FileError> {
    let Some(ca_path) = files.ca.as_deref() else {
        return Err(FileError::new(
            "caCertificates",
            "",
            "is required (no system trust store is used)",
        ));
    };
    let cas = pem_certs(contents.bytes("caCertificates", ca_path)?)
        .map_err(|reason| FileError::new("caCertificates", ca_path, reason))?;
    let mut roots = rustls::RootCertStore::empty();
    for (i, c) in cas.into_iter().enumerate() {
        roots
            .add(c)
            .map_err(|e| FileError::new("caCertificates", ca_path, format!("{}: {e}", nth(i))))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let versions = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| FileError::new("caCertificates", ca_path, e.to_string()))?;
    let builder = if files.sans.is_empty() {
        versions.with_root_certificates(roots)
    } else {
        // rustls calls any verifier of one's own "dangerous"; this one
        // verifies the chain exactly as the default one does and checks
        // the subject alternative names instead of the server name.
        let verifier = SanVerifier::new(roots, files.sans.clone(), &provider)
            .map_err(|e| FileError::new("caCertificates", ca_path, e))?;
        versions
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
    };
    if !files.mutual {
        return Ok((builder.with_no_client_auth(), None));
    }
    let cert_path = files.cert.as_deref().unwrap_or_default();
    let key_path = files.key.as_deref().unwrap_or_default();
    let cert_err = |reason: String| FileError::new("clientCertificate", cert_path, reason);
    let chain = pem_certs(contents.bytes("clientCertificate", cert_path)?).map_err(cert_err)?;
    let (facts, leaf_spki) = check_chain(&chain, now).map_err(cert_err)?;
    let key_err = |reason: String| FileError::new("privateKey", key_path, reason);
    let key = PrivateKeyDer::from_pem_slice(contents.bytes("privateKey", key_path)?).map_err(
        |e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => key_err("no private key block".into()),
            other => key_err(format!("not valid PEM: {other}")),
        },
    )?;
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| key_err(format!("unsupported private key: {e}")))?;
    // rustls would refuse a mismatch too (`keys_match`), but in words that
    // name neither file.
    if let Some(spki) = signing.public_key()
        && spki.as_ref() != leaf_spki.as_slice()
    {
        return Err(key_err(format!(
            "does not match the public key of clientCertificate {cert_path}"
        )));
    }
    let config = builder
        .with_client_auth_cert(chain, key)
        .map_err(|e| cert_err(e.to_string()))?;
    Ok((config, Some(facts)))
}

/// Verifies a server certificate's chain against the DestinationRule's
/// CA, then requires one of its DNS or URI subject alternative names to be
/// one of `subjectAltNames` (DNS names compared without regard to case).
/// The SNI the proxy sends is not checked: the names decide, as with the
/// SAN matchers Istio gives Envoy.
#[derive(Debug)]
struct SanVerifier {
    roots: Arc<rustls::RootCertStore>,
    sans: Vec<String>,
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
    /// For the handshake signatures, which a custom verifier must check too.
    inner: Arc<rustls::client::WebPkiServerVerifier>,
}

impl SanVerifier {
    fn new(
        roots: rustls::RootCertStore,
        sans: Vec<String>,
        provider: &Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<SanVerifier, String> {
        let roots = Arc::new(roots);
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::clone(&roots),
            Arc::clone(provider),
        )
        .build()
        .map_err(|e| e.to_string())?;
        Ok(SanVerifier {
            roots,
            sans,
            algs: provider.signature_verification_algorithms,
            inner,
        })
    }
}

impl rustls::client::danger::ServerCertVerifier for SanVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        // The chain verified, so the certificate parses; its names come
        // from the subject alternative name extension only.
        let (_, x509) = X509Certificate::from_der(end_entity.as_ref()).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        let names = x509
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|ext| ext.value.general_names.clone())
            .unwrap_or_default();
        let matched = names.iter().any(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => {
                self.sans.iter().any(|s| s.eq_ignore_ascii_case(d))
            }
            x509_parser::extensions::GeneralName::URI(u) => self.sans.iter().any(|s| s == u),
            _ => false,
        });
        if matched {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `certificate` for the first of a file, `certificate #i` for the others.
fn nth(i: usize) -> String {
    if i == 0 {
        "certificate".to_string()
    } else {
        format!("certificate #{i}")
    }
}

fn pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block".to_string());
    }
    Ok(certs)
}

/// Checks every certificate of a client chain at `now`: valid X.509,
/// version 3, within its validity period. Returns the leaf's facts and
/// its public key (SubjectPublicKeyInfo DER).
fn check_chain(
    chain: &[CertificateDer<'static>],
    now: OffsetDateTime,
) -> Result<(CertFacts, Vec<u8>), String> {
    let mut leaf = None;
    for (i, der) in chain.iter().enumerate() {
        let c = X509Certificate::from_der(der)
            .map_err(|e| format!("{} is not valid X.509: {e}", nth(i)))?
            .1;
        if c.version() != X509Version::V3 {
            return Err(format!(
                "{} is X.509 version {}; only version 3 is supported",
                nth(i),
                c.version().0 + 1
            ));
        }
        let not_before = c.validity().not_before.to_datetime();
        let not_after = c.validity().not_after.to_datetime();
        if now < not_before {
            return Err(format!(
                "{} is not valid before {}",
                nth(i),
                rfc3339(not_before)
            ));
        }
        if now > not_after {
            return Err(format!("{} expired at {}", nth(i), rfc3339(not_after)));
        }
        if i == 0 {
            let facts = CertFacts {
                subject: c.subject().to_string(),
                serial: hex::encode(c.raw_serial()),
                not_before,
                not_after,
            };
            leaf = Some((facts, c.public_key().raw.to_vec()));
        }
    }
    leaf.ok_or_else(|| "no CERTIFICATE block".to_string())
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

/// The state of one set of files.
#[derive(Debug, Default)]
struct SlotState {
    /// `ns/name` of the DestinationRules that name these files.
    owners: Vec<String>,
    /// The last good config.
    loaded: Option<Arc<Loaded>>,
    /// The last load error, when the last attempt failed.
    error: Option<Failed>,
    /// Fingerprint of the contents last tried.
    seen: Option<u64>,
}

impl SlotState {
    /// `ns/name` of the DestinationRule named in messages.
    fn owner(&self) -> &str {
        self.owners.first().map_or("(none)", String::as_str)
    }

    /// `DestinationRule ns/name`.
    fn source(&self) -> String {
        format!("DestinationRule {}", self.owner())
    }
}

#[derive(Debug)]
struct Failed {
    message: String,
    at: OffsetDateTime,
    tried: Instant,
}

#[derive(Debug)]
struct Slot {
    files: Files,
    state: Mutex<SlotState>,
}

/// The client configs of the DestinationRules in use, by files. Lives in
/// the proxy's [`crate::State`]; its [`generation`](DrFiles::generation)
/// changes whenever a config does, so prepared routes are rebuilt.
#[derive(Debug, Default)]
pub struct DrFiles {
    slots: Mutex<HashMap<Files, Arc<Slot>>>,
    generation: AtomicU64,
    /// The files' contents as the source last published them.
    published: Mutex<Arc<LocalFiles>>,
}

impl DrFiles {
    /// Takes the files' contents the source published; [`refresh`]
    /// (DrFiles::refresh) applies them.
    pub fn set_files(&self, files: Arc<LocalFiles>) {
        *self.published.lock().unwrap_or_else(|e| e.into_inner()) = files;
    }

    /// Brings the set of files in line with `snap`'s services: settings
    /// no service uses any more are forgotten; new ones are loaded, and
    /// the files of those kept are re-read (a change is applied as by
    /// [`refresh`](DrFiles::refresh)).
    pub fn sync(&self, snap: &Snapshot, metrics: &Metrics) {
        let mut wanted: HashMap<Files, Vec<String>> = HashMap::new();
        for svc in &snap.services {
            for tls in svc.tls.iter().chain(svc.port_tls.values().flatten()) {
                if let Some(files) = Files::of(tls) {
                    let owners = wanted.entry(files).or_default();
                    for o in owners_of(svc) {
                        if !owners.contains(&o) {
                            owners.push(o);
                        }
                    }
                }
            }
        }
        let slots: Vec<Arc<Slot>> = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots.retain(|files, _| wanted.contains_key(files));
            for (files, owners) in wanted {
                let slot = slots.entry(files.clone()).or_insert_with(|| {
                    Arc::new(Slot {
                        files,
                        state: Mutex::default(),
                    })
                });
                let mut st = slot.state.lock().unwrap_or_else(|e| e.into_inner());
                st.owners = owners;
            }
            slots.values().cloned().collect()
        };
        for slot in slots {
            self.refresh_slot(&slot, metrics, false);
        }
    }

    /// Looks at every DestinationRule's files again; those whose contents
    /// changed are loaded again. A change that cannot be used is refused
    /// (WARN, counted) and the previous config kept.
    pub fn refresh(&self, metrics: &Metrics) {
        let slots: Vec<Arc<Slot>> = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for slot in slots {
            self.refresh_slot(&slot, metrics, false);
        }
    }

    /// Loads `slot`'s files if they changed since the last attempt (or
    /// `always`).
    fn refresh_slot(&self, slot: &Slot, metrics: &Metrics, always: bool) {
        let published = Arc::clone(&self.published.lock().unwrap_or_else(|e| e.into_inner()));
        let contents = Contents::of(&slot.files, &published);
        let fingerprint = contents.fingerprint();
        let now = OffsetDateTime::now_utc();
        let mut st = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.seen == Some(fingerprint) && !always {
            return;
        }
        st.seen = Some(fingerprint);
        let source = st.source();
        match build(&slot.files, &contents, now) {
            Ok((config, facts)) => {
                let cert = facts.zip(slot.files.cert.clone());
                let replaced = st.loaded.is_some();
                if let Some((facts, path)) = &cert {
                    tracing::info!(
                        target: "meshward::certs",
                        destination_rule = %st.owner(),
                        file = %path,
                        subject = %facts.subject,
                        not_after = %rfc3339(facts.not_after),
                        "{}",
                        if replaced { "DestinationRule client certificate reloaded" } else { "DestinationRule client certificate loaded" }
                    );
                } else if replaced {
                    tracing::info!(target: "meshward::certs", destination_rule = %st.owner(), "DestinationRule CA certificates reloaded");
                }
                st.loaded = Some(Arc::new(Loaded {
                    config: Arc::new(config),
                    source,
                    cert,
                    loaded_at: now,
                }));
                st.error = None;
                // After the swap, so that routes prepared for the new
                // generation see the new config.
                self.generation.fetch_add(1, Ordering::AcqRel);
            }
            Err(e) => {
                let message = format!("{source}: {e}");
                let repeated = st.error.as_ref().is_some_and(|f| f.message == message);
                st.error = Some(Failed {
                    message: message.clone(),
                    at: now,
                    tried: Instant::now(),
                });
                if repeated {
                    return;
                }
                metrics.config_rejected();
                if st.loaded.is_some() {
                    tracing::warn!(target: "meshward::certs", destination_rule = %st.owner(), file = %e.path, reason = %e.reason, "{message}: change refused; keeping the previous client config");
                } else {
                    tracing::warn!(target: "meshward::certs", destination_rule = %st.owner(), file = %e.path, reason = %e.reason, "{message}: its requests fail with 503 until the files can be used");
                }
            }
        }
    }

    /// The client config for `tls` (a service's SIMPLE or MUTUAL
    /// settings), or why there is none: `DestinationRule ns/name:
    /// clientCertificate FILE: reason`.
    pub fn client(
        &self,
        svc: &Service,
        tls: &ClientTls,
        metrics: &Metrics,
    ) -> Result<Arc<Loaded>, String> {
        let files = Files::of(tls)
            .ok_or_else(|| format!("mode {} takes no DestinationRule files", tls.mode.as_str()))?;
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            // Settings of a snapshot that is not (or no longer) the one
            // synced, e.g. a request that started before a reload.
            Arc::clone(slots.entry(files.clone()).or_insert_with(|| {
                Arc::new(Slot {
                    files,
                    state: Mutex::new(SlotState {
                        owners: owners_of(svc),
                        ..SlotState::default()
                    }),
                })
            }))
        };
        let retry = {
            let st = slot.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(loaded) = &st.loaded {
                return Ok(Arc::clone(loaded));
            }
            st.error
                .as_ref()
                .is_none_or(|f| f.tried.elapsed() >= RETRY_UNUSABLE)
        };
        if retry {
            self.refresh_slot(&slot, metrics, true);
        }
        let st = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        match (&st.loaded, &st.error) {
            (Some(loaded), _) => Ok(Arc::clone(loaded)),
            (None, Some(f)) => Err(f.message.clone()),
            (None, None) => Err(format!("{}: files not loaded", st.source())),
        }
    }

    /// Changes whenever a client config is replaced.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// For `/config_dump`: per set of files, the DestinationRules naming
    /// them, the loaded client certificate and the last load error.
    pub fn describe(&self) -> serde_json::Value {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<serde_json::Value> = slots
            .values()
            .map(|slot| {
                let st = slot.state.lock().unwrap_or_else(|e| e.into_inner());
                let f = &slot.files;
                json!({
                    "destination_rules": st.owners,
                    "mode": if f.mutual { "MUTUAL" } else { "SIMPLE" },
                    "caCertificates": f.ca,
                    "clientCertificate": f.cert,
                    "privateKey": f.key,
                    "status": if st.loaded.is_some() { "loaded" } else { "unusable" },
                    "loaded_at": st.loaded.as_ref().map(|l| rfc3339(l.loaded_at)),
                    "client_certificate": st.loaded.as_ref().and_then(|l| l.cert.as_ref()).map(|(c, _)| json!({
                        "subject": c.subject,
                        "serial": c.serial,
                        "not_before": rfc3339(c.not_before),
                        "not_after": rfc3339(c.not_after),
                    })),
                    "last_error": st.error.as_ref().map(|e| json!({"message": e.message, "at": rfc3339(e.at)})),
                })
            })
            .collect();
        out.sort_by_key(|v| v["destination_rules"].to_string());
        serde_json::Value::Array(out)
    }
}

/// `ns/name` of the DestinationRule whose settings `svc` uses (the one
/// istiod's lookup picks for this proxy; see `policy::destination_rule`).
fn owners_of(svc: &Service) -> Vec<String> {
    svc.destination_rule.iter().cloned().collect()
}

/// What went wrong in a TLS exchange with an upstream.
#[derive(Debug, Clone, Copy)]
pub enum TlsFailure<'e> {
    /// The server refused the certificate this proxy presented (or its
    /// absence) with an alert.
    CertificateRefused(AlertDescription),
    /// The server ended the handshake with another alert.
    Alert(AlertDescription),
    /// The server's certificate failed this proxy's verification.
    ServerCertificate(&'e rustls::Error),
    /// Any other TLS error.
    Other(&'e rustls::Error),
}

/// The TLS failure behind `err`, if any: a rustls error anywhere in its
/// chain of sources, including inside I/O errors (whose `source` skips
/// the error they wrap).
pub fn tls_failure<'e>(err: &'e (dyn std::error::Error + 'static)) -> Option<TlsFailure<'e>> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(classify(r));
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            let inner: &(dyn std::error::Error + 'static) = inner;
            if let Some(f) = tls_failure(inner) {
                return Some(f);
            }
        }
        cur = e.source();
    }
    None
}

fn classify(e: &rustls::Error) -> TlsFailure<'_> {
    use AlertDescription as A;
    match e {
        rustls::Error::AlertReceived(
            a @ (A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::CertificateRequired
            | A::AccessDenied),
        ) => TlsFailure::CertificateRefused(*a),
        rustls::Error::AlertReceived(a) => TlsFailure::Alert(*a),
        rustls::Error::InvalidCertificate(_) | rustls::Error::InvalidCertRevocationList(_) => {
            TlsFailure::ServerCertificate(e)
        }
        _ => TlsFailure::Other(e),
    }
}

/// Who presented what in a failed upstream TLS exchange.
#[derive(Debug, Clone, Copy)]
pub enum Presented<'a> {
    /// Mesh mTLS: the workload's own certificate.
    Workload,
    /// DestinationRule files (SIMPLE or MUTUAL).
    Files(&'a Loaded),
}

/// The words for a TLS failure: who refused what. A server that refused
/// this proxy's certificate is told apart from a server certificate this
/// proxy refused.
pub fn describe_failure(f: TlsFailure<'_>, presented: Presented<'_>) -> String {
    match (f, presented) {
        (TlsFailure::CertificateRefused(a), Presented::Workload) => {
            format!("TLS: the server refused this workload's certificate (alert {a:?})")
        }
        (TlsFailure::CertificateRefused(a), Presented::Files(l)) => format!(
            "TLS: the server refused the client certificate (alert {a:?}) of {}",
            l.presented(OffsetDateTime::now_utc())
        ),
        (TlsFailure::Alert(a), _) => format!("TLS: the server ended the handshake (alert {a:?})"),
        (TlsFailure::ServerCertificate(e), _) => {
            format!("TLS: the server's certificate failed this proxy's verification: {e}")
        }
        (TlsFailure::Other(e), _) => format!("TLS: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};
    use std::path::Path;

    fn files(dir: &Path) -> Files {
        let p = |n: &str| Some(dir.join(n).to_str().unwrap().to_string());
        Files {
            mutual: true,
            ca: p("ca.pem"),
            cert: p("cert.pem"),
            key: p("key.pem"),
            sans: Vec::new(),
        }
    }

    /// A self-signed CA file and a leaf it signed (with `adjust` applied).
    fn write_pki(dir: &Path, adjust: impl FnOnce(&mut CertificateParams)) -> KeyPair {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let mut params = CertificateParams::new(vec!["client.test".to_string()]).unwrap();
        adjust(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        key
    }

    fn load(dir: &Path) -> Result<Option<CertFacts>, FileError> {
        let f = files(dir);
        // What the file source publishes for them.
        let published: LocalFiles = f
            .paths()
            .map(|(_, p)| {
                let read = std::fs::read(p).map(Arc::from).map_err(|e| e.to_string());
                (p.to_string(), read)
            })
            .collect();
        build(&f, &Contents::of(&f, &published), OffsetDateTime::now_utc()).map(|(_, facts)| facts)
    }

    #[test]
    fn a_good_pair_loads_with_its_facts() {
        let dir = tempfile::tempdir().unwrap();
        write_pki(dir.path(), |_| {});
        let facts = load(dir.path()).unwrap().unwrap();
        assert!(facts.not_after > OffsetDateTime::now_utc());
    }

    #[test]
    fn an_expired_or_future_certificate_is_a_problem_of_its_file() {
        let dir = tempfile::tempdir().unwrap();
        write_pki(dir.path(), |p| {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        });
        let e = load(dir.path()).unwrap_err();
        assert_eq!(e.field, "clientCertificate");
        assert!(e.path.ends_with("cert.pem"), "{e}");
        assert_eq!(e.reason, "certificate expired at 2021-01-01T00:00:00Z");

        write_pki(dir.path(), |p| {
            p.not_before = rcgen::date_time_ymd(2999, 1, 1);
            p.not_after = rcgen::date_time_ymd(3000, 1, 1);
        });
        let e = load(dir.path()).unwrap_err();
        assert_eq!(
            e.reason,
            "certificate is not valid before 2999-01-01T00:00:00Z"
        );
    }

    #[test]
    fn a_key_of_another_certificate_is_refused_naming_both_files() {
        let dir = tempfile::tempdir().unwrap();
        write_pki(dir.path(), |_| {});
        let other = KeyPair::generate().unwrap();
        std::fs::write(dir.path().join("key.pem"), other.serialize_pem()).unwrap();
        let e = load(dir.path()).unwrap_err();
        assert_eq!(e.field, "privateKey");
        assert!(e.path.ends_with("key.pem"));
        assert!(
            e.reason
                .starts_with("does not match the public key of clientCertificate "),
            "{e}"
        );
        assert!(e.reason.ends_with("cert.pem"), "{e}");
    }

    #[test]
    fn unreadable_and_malformed_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        write_pki(dir.path(), |_| {});
        std::fs::write(dir.path().join("cert.pem"), "garbage").unwrap();
        let e = load(dir.path()).unwrap_err();
        assert_eq!(
            (e.field, e.reason.as_str()),
            ("clientCertificate", "no CERTIFICATE block")
        );
        std::fs::remove_file(dir.path().join("key.pem")).unwrap();
        write_pki(dir.path(), |_| {});
        std::fs::remove_file(dir.path().join("key.pem")).unwrap();
        let e = load(dir.path()).unwrap_err();
        assert_eq!(e.field, "privateKey");
        assert!(e.reason.starts_with("cannot read: "), "{e}");
        std::fs::write(
            dir.path().join("key.pem"),
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = load(dir.path()).unwrap_err();
        assert!(e.reason.starts_with("unsupported private key: "), "{e}");
    }

    #[test]
    fn only_version_3_certificates_are_used() {
        let dir = tempfile::tempdir().unwrap();
        write_pki(dir.path(), |_| {});
        let mut chain = pem_certs(&std::fs::read(dir.path().join("cert.pem")).unwrap()).unwrap();
        // The TBSCertificate's `[0] EXPLICIT INTEGER 2` (v3) made 1 (v2):
        // same length, so the DER stays well formed.
        let mut der = chain[0].to_vec();
        let at = der
            .windows(5)
            .position(|w| w == [0xa0, 0x03, 0x02, 0x01, 0x02])
            .unwrap();
        der[at + 4] = 0x01;
        chain[0] = CertificateDer::from(der);
        let e = check_chain(&chain, OffsetDateTime::now_utc()).unwrap_err();
        assert!(e.contains("version 2"), "{e}");
    }

    #[test]
    fn tls_failures_are_found_inside_io_errors() {
        let alert = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(AlertDescription::CertificateExpired),
        );
        assert!(matches!(
            tls_failure(&alert),
            Some(TlsFailure::CertificateRefused(
                AlertDescription::CertificateExpired
            ))
        ));
        let bad_server = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(bad_server);
        assert!(matches!(
            tls_failure(&*boxed),
            Some(TlsFailure::ServerCertificate(_))
        ));
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(tls_failure(&plain).is_none());
    }
}
