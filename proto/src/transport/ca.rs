//! A cluster's own certificate authority (`moeshard certs`): a self-signed CA certificate
//! and key, and the certificates it issues for mutual TLS — one per node (server and client
//! authentication, with the names the coordinator reaches it by) and one for the
//! coordinator (client authentication).
//!
//! Keys are ECDSA P-256. The CA may sign end certificates only (path length 0). Validity
//! starts an hour back (clock skew between hosts) and lasts the days asked for.

use std::fmt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use super::tls::{write_pem_file, ClientTls, ServerTls};
use super::{TlsIdentity, TransportError};

/// How long a CA made by `moeshard certs init` is valid, in days.
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// How long an issued certificate is valid, in days.
pub const DEFAULT_CERT_DAYS: u32 = 825;

/// The organization written into every certificate's subject.
const ORGANIZATION: &str = "moeshard";

/// Whether `name` can be a certificate's subject alternative name and the name a client
/// connects with: a DNS name or an IP address.
pub fn is_tls_name(name: &str) -> bool {
    rustls::pki_types::ServerName::try_from(name).is_ok()
}

/// What an issued certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertUse {
    /// An expert node: server authentication (and client, for node-to-node links to come).
    Node,
    /// The coordinator: client authentication only.
    Coordinator,
}

/// A CA certificate and its key.
pub struct CertAuthority {
    cert_pem: String,
    key_pem: String,
    /// The CA as rcgen signs with it (rebuilt from the PEM when loaded: same subject, key
    /// and key identifier, so what it signs chains to the certificate in `cert_pem`).
    issuer: rcgen::Certificate,
    key: KeyPair,
}

impl fmt::Debug for CertAuthority {
    /// Shows the certificate, never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertAuthority")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

fn ca_err(what: &str, detail: impl fmt::Display) -> TransportError {
    TransportError::Identity {
        what: what.to_string(),
        detail: detail.to_string(),
    }
}

/// Validity from an hour ago (clock skew) for `days` days.
fn validity(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(days.max(1)));
}

fn subject(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    dn.push(DnType::CommonName, common_name);
    dn
}

impl CertAuthority {
    /// A new CA named after `cluster` (its subject is `CN=moeshard CA <cluster>`), valid
    /// for `days` days.
    pub fn generate(cluster: &str, days: u32) -> Result<CertAuthority, TransportError> {
        let what = format!("CA for cluster {cluster:?}");
        let key = KeyPair::generate().map_err(|e| ca_err(&what, e))?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| ca_err(&what, e))?;
        params.distinguished_name = subject(&format!("moeshard CA {cluster}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, days);
        let issuer = params.self_signed(&key).map_err(|e| ca_err(&what, e))?;
        Ok(CertAuthority {
            cert_pem: issuer.pem(),
            key_pem: key.serialize_pem(),
            issuer,
            key,
        })
    }

    /// The CA of `cert_pem` and `key_pem`; refuses a key that does not belong to the
    /// certificate, or a certificate that is not a CA.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<CertAuthority, TransportError> {
        let what = "the CA";
        let key = KeyPair::from_pem(key_pem).map_err(|e| ca_err(what, format!("key: {e}")))?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem)
            .map_err(|e| ca_err(what, format!("certificate: {e}")))?;
        if !matches!(params.is_ca, IsCa::Ca(_)) {
            return Err(ca_err(what, "the certificate is not a CA certificate"));
        }
        let issuer = params.self_signed(&key).map_err(|e| ca_err(what, e))?;
        let ca = CertAuthority {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            issuer,
            key,
        };
        // What it signs must chain to the certificate as written, i.e. the key is its key.
        let probe = ca.issue(
            "probe",
            &["probe.invalid".to_string()],
            CertUse::Coordinator,
            1,
        )?;
        ClientTls::mutual(ca.cert_pem.clone(), probe)
            .map_err(|_| ca_err(what, "the key does not belong to the CA certificate"))?;
        Ok(ca)
    }

    /// Reads the CA from its files.
    pub fn load(cert: &Path, key: &Path) -> Result<CertAuthority, TransportError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| TransportError::Identity {
                what: p.display().to_string(),
                detail: format!("reading: {e}"),
            })
        };
        CertAuthority::from_pem(&read(cert)?, &read(key)?).map_err(|e| match e {
            TransportError::Identity { detail, .. } => TransportError::Identity {
                what: format!("{} + {}", cert.display(), key.display()),
                detail,
            },
            e => e,
        })
    }

    /// Writes the key (mode 0600) and the certificate (0644), each through a temporary
    /// file renamed over the path.
    pub fn save(&self, cert: &Path, key: &Path) -> Result<(), TransportError> {
        write_pem_file(key, &self.key_pem, 0o600)?;
        write_pem_file(cert, &self.cert_pem, 0o644)
    }

    /// The CA certificate (PEM): what both sides of a mutual-TLS link trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A new key and a certificate for it signed by this CA, with subject
    /// `CN=<common_name>` and `names` (DNS names or IP addresses) as its subject
    /// alternative names, valid for `days` days.
    pub fn issue(
        &self,
        common_name: &str,
        names: &[String],
        usage: CertUse,
        days: u32,
    ) -> Result<TlsIdentity, TransportError> {
        let what = format!("certificate for {common_name:?}");
        for name in names {
            if !is_tls_name(name) {
                return Err(ca_err(
                    &what,
                    format!("{name:?} is neither a DNS name nor an IP address"),
                ));
            }
        }
        let key = KeyPair::generate().map_err(|e| ca_err(&what, e))?;
        let mut params = CertificateParams::new(names.to_vec())
            .map_err(|e| ca_err(&what, format!("names {names:?}: {e}")))?;
        params.distinguished_name = subject(common_name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match usage {
            CertUse::Node => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            CertUse::Coordinator => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, days);
        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(|e| ca_err(&what, e))?;
        Ok(TlsIdentity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A node's TLS configuration: `identity`, accepting only clients this CA signed.
    pub fn server_tls(&self, identity: TlsIdentity) -> Result<ServerTls, TransportError> {
        ServerTls::mutual(identity, self.cert_pem.clone())
    }

    /// The coordinator's TLS configuration: `identity`, trusting only nodes this CA signed.
    pub fn client_tls(&self, identity: TlsIdentity) -> Result<ClientTls, TransportError> {
        ClientTls::mutual(self.cert_pem.clone(), identity)
    }
}
