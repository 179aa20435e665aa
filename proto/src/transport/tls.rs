//! TLS for the network transports: identities (certificate and key, PEM), what each side of
//! a link trusts ([`ServerTls`], [`ClientTls`]), and the rustls configurations built from
//! them with the ring provider passed explicitly (nothing is installed process-wide). TLS
//! 1.3 only.
//!
//! Two ways to trust:
//!
//! - **Server authentication only** (QUIC without a cluster CA, loopback): the client trusts
//!   exactly the certificate it is given (the node's own, self-signed one) as its only root
//!   and presents none; the node accepts any client.
//! - **Mutual** ([`ServerTls::mutual`], [`ClientTls::mutual`]): the cluster's certificate
//!   authority ([`CertAuthority`](super::CertAuthority), `moeshard certs`) signed both the
//!   node's certificate and the coordinator's. The node refuses a client that presents no
//!   certificate or one the CA did not sign; the coordinator refuses a node whose
//!   certificate the CA did not sign.
//!
//! Either way the name the client connects with must be one of the node certificate's names.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, RootCertStore};

use super::TransportError;

/// The ALPN protocol both sides of a QUIC link require.
pub(crate) const ALPN: &[u8] = b"moeshard/1";
/// The ALPN protocol of gRPC links (HTTP/2).
pub(crate) const ALPN_H2: &[u8] = b"h2";

/// A certificate chain and its private key, both PEM: a node's, or the coordinator's.
#[derive(Clone)]
pub struct TlsIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for TlsIdentity {
    /// Shows the certificate, never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

fn identity_err(what: &Path, detail: String) -> TransportError {
    TransportError::Identity {
        what: what.display().to_string(),
        detail,
    }
}

fn read_pem_file(path: &Path) -> Result<String, TransportError> {
    fs::read_to_string(path).map_err(|e| identity_err(path, format!("reading: {e}")))
}

impl TlsIdentity {
    /// A new self-signed certificate for `names` (DNS names or IP addresses; for loopback
    /// `["localhost", "127.0.0.1"]`) and its key.
    pub fn self_signed(names: &[&str]) -> Result<TlsIdentity, TransportError> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let generated = rcgen::generate_simple_self_signed(names.clone()).map_err(|e| {
            TransportError::Identity {
                what: format!("self-signed certificate for {names:?}"),
                detail: e.to_string(),
            }
        })?;
        Ok(TlsIdentity {
            cert_pem: generated.cert.pem(),
            key_pem: generated.key_pair.serialize_pem(),
        })
    }

    /// Reads the identity from `cert` and `key` (both must exist) and checks that the key
    /// belongs to the certificate.
    pub fn load(cert: &Path, key: &Path) -> Result<TlsIdentity, TransportError> {
        let identity = TlsIdentity {
            cert_pem: read_pem_file(cert)?,
            key_pem: read_pem_file(key)?,
        };
        identity
            .check()
            .map_err(|detail| TransportError::Identity {
                what: format!("{} + {}", cert.display(), key.display()),
                detail,
            })?;
        Ok(identity)
    }

    /// Reads the identity from `cert` and `key`; if neither file exists, generates a
    /// self-signed one for `names` and writes it there first (each file to a temporary
    /// name, then renamed; the key with mode 0600). One file without the other is an
    /// error, as is a certificate or key that cannot be used.
    pub fn load_or_create(
        cert: &Path,
        key: &Path,
        names: &[&str],
    ) -> Result<TlsIdentity, TransportError> {
        let exists = |p: &Path| p.try_exists().map_err(|e| identity_err(p, e.to_string()));
        match (exists(cert)?, exists(key)?) {
            (true, true) => TlsIdentity::load(cert, key),
            (false, false) => {
                let identity = TlsIdentity::self_signed(names)?;
                identity.save(cert, key)?;
                tracing::info!(cert = %cert.display(), key = %key.display(), ?names,
                    "generated a self-signed TLS identity");
                Ok(identity)
            }
            (cert_exists, _) => {
                let (there, missing) = if cert_exists {
                    (cert, key)
                } else {
                    (key, cert)
                };
                Err(TransportError::Identity {
                    what: format!("{} + {}", cert.display(), key.display()),
                    detail: format!(
                        "{} exists but {} does not: give both or neither (then they are generated)",
                        there.display(),
                        missing.display()
                    ),
                })
            }
        }
    }

    /// Writes the key (mode 0600) and the certificate (0644), each to a temporary name
    /// beside its path and then renamed over it.
    pub fn save(&self, cert: &Path, key: &Path) -> Result<(), TransportError> {
        write_pem_file(key, &self.key_pem, 0o600)?;
        write_pem_file(cert, &self.cert_pem, 0o644)
    }

    /// `Err` says why the certificate and key cannot be used together.
    fn check(&self) -> Result<(), String> {
        certified_key(self).and_then(|(certs, key)| {
            rustls::ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| e.to_string())?
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .map(drop)
                .map_err(|e| format!("certificate and key: {e}"))
        })
    }
}

/// Writes `text` to `path` through a temporary file (created with `mode`), as
/// [`TlsIdentity::save`] does.
pub(crate) fn write_pem_file(path: &Path, text: &str, mode: u32) -> Result<(), TransportError> {
    write_via_temp(path, text.as_bytes(), mode)
        .map_err(|e| identity_err(path, format!("writing: {e}")))
}

/// Writes `bytes` to a temporary name beside `path` (created with `mode` on Unix), then
/// renames it to `path`.
fn write_via_temp(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other("the path has no file name"))?;
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let result = options.open(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    let result = result.and_then(|()| fs::rename(&tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// What a node presents and whom it accepts.
#[derive(Clone, Debug)]
pub struct ServerTls {
    identity: TlsIdentity,
    /// Mutual TLS: the CA that must have signed a client's certificate.
    client_ca_pem: Option<String>,
}

impl ServerTls {
    /// Presents `identity`; accepts any client (server authentication only).
    pub fn server_only(identity: TlsIdentity) -> ServerTls {
        ServerTls {
            identity,
            client_ca_pem: None,
        }
    }

    /// Presents `identity`, which `ca_pem` must have signed (checked here, so that a
    /// misconfigured node refuses to start rather than every connection); accepts only
    /// clients presenting a certificate signed by `ca_pem`.
    pub fn mutual(identity: TlsIdentity, ca_pem: String) -> Result<ServerTls, TransportError> {
        let tls = ServerTls::new(identity, Some(ca_pem));
        tls.check()?;
        Ok(tls)
    }

    /// As given, unchecked: for tests of what a misconfigured or hostile node does.
    pub fn new(identity: TlsIdentity, client_ca_pem: Option<String>) -> ServerTls {
        ServerTls {
            identity,
            client_ca_pem,
        }
    }

    pub fn identity(&self) -> &TlsIdentity {
        &self.identity
    }

    /// Whether clients must present a certificate.
    pub fn is_mutual(&self) -> bool {
        self.client_ca_pem.is_some()
    }

    /// The configuration builds, and the identity is signed by the client CA if there is one.
    fn check(&self) -> Result<(), TransportError> {
        let bad = |detail: String| TransportError::Identity {
            what: "the node's certificate".into(),
            detail,
        };
        server_config(self, ALPN).map_err(bad)?;
        if let Some(ca) = &self.client_ca_pem {
            check_issued_by(ca, &self.identity.cert_pem, Role::Server).map_err(bad)?;
        }
        Ok(())
    }
}

/// What the coordinator trusts and presents.
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// The roots a node's certificate must chain to: the cluster CA, or the node's own
    /// self-signed certificate.
    roots_pem: String,
    /// Presented when the node asks (mutual TLS).
    identity: Option<TlsIdentity>,
}

impl ClientTls {
    /// Trusts `cert_pem` (a node's self-signed certificate, or a CA) as the only root and
    /// presents no certificate.
    pub fn trusting(cert_pem: impl Into<String>) -> ClientTls {
        ClientTls {
            roots_pem: cert_pem.into(),
            identity: None,
        }
    }

    /// Trusts nodes whose certificate `ca_pem` signed and presents `identity`, which
    /// `ca_pem` must have signed too (checked here).
    pub fn mutual(ca_pem: String, identity: TlsIdentity) -> Result<ClientTls, TransportError> {
        let bad = |detail: String| TransportError::Identity {
            what: "the coordinator's client certificate".into(),
            detail,
        };
        check_issued_by(&ca_pem, &identity.cert_pem, Role::Client).map_err(bad)?;
        let tls = ClientTls::new(ca_pem, Some(identity));
        client_config(&tls, ALPN).map_err(bad)?;
        Ok(tls)
    }

    /// As given, unchecked: for tests of what a misconfigured or hostile client does.
    pub fn new(roots_pem: String, identity: Option<TlsIdentity>) -> ClientTls {
        ClientTls {
            roots_pem,
            identity,
        }
    }

    /// Whether a certificate is presented.
    pub fn is_mutual(&self) -> bool {
        self.identity.is_some()
    }
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(crate) fn certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the PEM text".into());
    }
    Ok(certs)
}

fn certified_key(
    identity: &TlsIdentity,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let certs = certificates(&identity.cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
        .map_err(|e| format!("private key PEM: {e}"))?;
    Ok((certs, key))
}

fn roots(pem: &str, what: &str) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(pem).map_err(|e| format!("{what}: {e}"))? {
        roots.add(cert).map_err(|e| format!("{what}: {e}"))?;
    }
    Ok(Arc::new(roots))
}

/// Which side a certificate is checked for.
#[derive(Clone, Copy)]
enum Role {
    Server,
    Client,
}

/// Whether `ca_pem` signed the first certificate of `cert_pem` (the others are taken as
/// intermediates), as a peer would check it now, for `role`. A node's certificate is not
/// checked against a name here: the name depends on how the coordinator reaches it.
fn check_issued_by(ca_pem: &str, cert_pem: &str, role: Role) -> Result<(), String> {
    let roots = roots(ca_pem, "the CA certificate")?;
    let certs = certificates(cert_pem)?;
    let (end_entity, intermediates) = certs.split_first().ok_or("no certificate")?;
    let now = UnixTime::now();
    let outcome = match role {
        Role::Server => {
            let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
                .build()
                .map_err(|e| e.to_string())?;
            let any_name = ServerName::try_from("name.invalid").map_err(|e| e.to_string())?;
            match verifier.verify_server_cert(end_entity, intermediates, &any_name, &[], now) {
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => Ok(()),
                other => other.map(drop),
            }
        }
        Role::Client => {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
                .build()
                .map_err(|e| e.to_string())?;
            verifier
                .verify_client_cert(end_entity, intermediates, now)
                .map(drop)
        }
    };
    outcome.map_err(|e| match e {
        rustls::Error::InvalidCertificate(
            e @ (CertificateError::UnknownIssuer | CertificateError::BadSignature),
        ) => format!("not signed by the cluster CA ({e:?})"),
        e => format!("checked against the cluster CA: {e}"),
    })
}

/// The node side's rustls configuration; `Err` says what is wrong.
pub(crate) fn server_config(tls: &ServerTls, alpn: &[u8]) -> Result<rustls::ServerConfig, String> {
    let (certs, key) = certified_key(&tls.identity)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?;
    let builder = match &tls.client_ca_pem {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(
                roots(ca, "the client CA")?,
                provider(),
            )
            .build()
            .map_err(|e| format!("the client CA: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// The coordinator side's rustls configuration: the roots are the only ones trusted.
pub(crate) fn client_config(tls: &ClientTls, alpn: &[u8]) -> Result<rustls::ClientConfig, String> {
    let roots = roots(&tls.roots_pem, "trusted certificate")?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut config = match &tls.identity {
        Some(identity) => {
            let (certs, key) = certified_key(identity)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("client certificate and key: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// The common name in a certificate's subject (for logs), if it has one that parses.
pub(crate) fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    // Parses any certificate's subject, not only a CA's.
    let params = rcgen::CertificateParams::from_ca_cert_der(cert).ok()?;
    match params.distinguished_name.get(&rcgen::DnType::CommonName)? {
        rcgen::DnValue::Utf8String(s) => Some(s.clone()),
        rcgen::DnValue::PrintableString(s) => Some(s.as_str().to_string()),
        rcgen::DnValue::Ia5String(s) => Some(s.as_str().to_string()),
        rcgen::DnValue::TeletexString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}
