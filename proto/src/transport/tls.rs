//! TLS for the QUIC transport: a node's identity (certificate and key, PEM), and the
//! rustls configurations built from it with the ring provider passed explicitly (nothing
//! is installed process-wide).
//!
//! A client trusts exactly the certificate it is given (the node's own, self-signed one in
//! the cluster file) as its only root; the name it connects with must be one of the
//! certificate's names. TLS 1.3 only, ALPN [`ALPN`].

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::TransportError;

/// The ALPN protocol both sides require.
pub(crate) const ALPN: &[u8] = b"moeshard/1";

/// A node's TLS certificate chain and private key, both PEM.
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

    /// Reads the identity from `cert` and `key`; if neither file exists, generates a
    /// self-signed one for `names` and writes it there first (each file to a temporary
    /// name, then renamed; the key with mode 0600). One file without the other is an
    /// error, as is a certificate or key that cannot be used.
    pub fn load_or_create(
        cert: &Path,
        key: &Path,
        names: &[&str],
    ) -> Result<TlsIdentity, TransportError> {
        let what = || format!("{} + {}", cert.display(), key.display());
        let exists = |p: &Path| {
            p.try_exists().map_err(|e| TransportError::Identity {
                what: p.display().to_string(),
                detail: e.to_string(),
            })
        };
        let identity = match (exists(cert)?, exists(key)?) {
            (true, true) => {
                let read = |p: &Path| {
                    fs::read_to_string(p).map_err(|e| TransportError::Identity {
                        what: p.display().to_string(),
                        detail: format!("reading: {e}"),
                    })
                };
                TlsIdentity {
                    cert_pem: read(cert)?,
                    key_pem: read(key)?,
                }
            }
            (false, false) => {
                let identity = TlsIdentity::self_signed(names)?;
                let write = |p: &Path, text: &str, mode: u32| {
                    write_via_temp(p, text.as_bytes(), mode).map_err(|e| TransportError::Identity {
                        what: p.display().to_string(),
                        detail: format!("writing: {e}"),
                    })
                };
                write(key, &identity.key_pem, 0o600)?;
                write(cert, &identity.cert_pem, 0o644)?;
                tracing::info!(cert = %cert.display(), key = %key.display(), ?names,
                    "generated a self-signed TLS identity");
                identity
            }
            (cert_exists, _) => {
                let (there, missing) = if cert_exists {
                    (cert, key)
                } else {
                    (key, cert)
                };
                return Err(TransportError::Identity {
                    what: what(),
                    detail: format!(
                        "{} exists but {} does not: give both or neither (then they are generated)",
                        there.display(),
                        missing.display()
                    ),
                });
            }
        };
        // Refuse an unusable pair now rather than at the first connection.
        server_config(&identity).map_err(|e| TransportError::Identity {
            what: what(),
            detail: e,
        })?;
        Ok(identity)
    }
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
    let mut options = OpenOptions::new();
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

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the PEM text".into());
    }
    Ok(certs)
}

/// The server side's rustls configuration for `identity`; `Err` says what is wrong.
pub(crate) fn server_config(identity: &TlsIdentity) -> Result<rustls::ServerConfig, String> {
    let certs = certificates(&identity.cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
        .map_err(|e| format!("private key PEM: {e}"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// The client side's rustls configuration: `trusted_cert_pem` is the only root.
pub(crate) fn client_config(trusted_cert_pem: &str) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(trusted_cert_pem)? {
        roots
            .add(cert)
            .map_err(|e| format!("trusted certificate: {e}"))?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}
