//! TLS credentials for the replication link, in QEMU's `tls-creds-x509`
//! directory layout, so a COLO setup's existing certificates carry over:
//!
//! * server: `ca-cert.pem`, `server-cert.pem`, `server-key.pem`; the server
//!   asks every client for a certificate signed by the CA;
//! * client: `ca-cert.pem`, and `client-cert.pem` + `client-key.pem` (both
//!   optional, as in QEMU; a server that requires a client certificate then
//!   refuses the connection).
//!
//! Credentials are checked when loaded (missing file, key readable by others,
//! key not matching its certificate, certificate expired or not yet valid),
//! so a bad setup fails at start with a message naming the file, not at the
//! first handshake. [`ServerTls::reload`] / [`ClientTls::reload`] swap in new
//! credentials for later handshakes; established sessions are untouched.
//!
//! Client identities for `--tls-authz` are the certificate subject rendered
//! as QEMU's `authz-simple` sees it (GnuTLS `gnutls_x509_crt_get_dn`, checked
//! against qemu-nbd 10 in tests/nbd_tls.rs): the attributes in certificate
//! order, comma-separated, e.g. `C=GB,O=Example,CN=client`.
//!
//! TLS-PSK (`--tls-creds-psk`) is not available: rustls has no external
//! pre-shared-key support (rustls issue #174); [`psk_unsupported`] says so.

use crate::sync::RwLockExt;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use thiserror::Error;

/// CA certificate file name in a credentials directory (QEMU's name).
pub const CA_CERT: &str = "ca-cert.pem";
/// Server certificate file name.
pub const SERVER_CERT: &str = "server-cert.pem";
/// Server private key file name.
pub const SERVER_KEY: &str = "server-key.pem";
/// Client certificate file name.
pub const CLIENT_CERT: &str = "client-cert.pem";
/// Client private key file name.
pub const CLIENT_KEY: &str = "client-key.pem";

/// Why credentials could not be loaded or a peer was refused.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A file the layout requires is not there.
    #[error("TLS credentials: {path} is missing")]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// A file could not be read or parsed.
    #[error("TLS credentials: cannot read {path}: {why}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// A private key others may read.
    #[error(
        "TLS credentials: private key {path} is readable by group or others \
         (mode {mode:o}); run chmod 600 on it"
    )]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A certificate outside its validity period.
    #[error("TLS credentials: certificate {path} {why}")]
    Validity {
        /// The certificate file.
        path: PathBuf,
        /// "expired on ..." or "is not valid before ...".
        why: String,
    },
    /// The private key does not belong to the certificate.
    #[error("TLS credentials: {key} does not match the certificate {cert}: {why}")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls' reason.
        why: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// An unusable `--tls-hostname`.
    #[error("TLS: {0:?} is not a valid server name for certificate checks")]
    Hostname(String),
    /// A verified client whose identity `--tls-authz` does not list.
    #[error("TLS: client identity {0:?} is not authorised (--tls-authz)")]
    NotAuthorised(String),
    /// PSK credentials were asked for.
    #[error(
        "--tls-creds-psk: TLS-PSK is not supported: rustls has no external \
         pre-shared-key support (rustls issue #174); use --tls-creds-x509"
    )]
    PskUnsupported,
}

/// The error `--tls-creds-psk` gets.
pub fn psk_unsupported() -> TlsError {
    TlsError::PskUnsupported
}

/// ring's suites, AES-128-GCM first: the link carries bulk disk data, and
/// AES-128 needs fewer rounds than AES-256 for the same (ample) security
/// margin. Every default suite stays available for peers that prefer others.
fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    let first = [
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
        rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ];
    p.cipher_suites.sort_by_key(|s| !first.contains(&s.suite()));
    Arc::new(p)
}

fn need(dir: &Path, name: &str) -> Result<PathBuf, TlsError> {
    let path = dir.join(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(TlsError::Missing { path })
    }
}

fn unreadable(path: &Path, why: impl ToString) -> TlsError {
    TlsError::Unreadable {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

/// Reads every certificate of a PEM file, each checked for its validity period.
fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| unreadable(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| unreadable(path, e))?;
    if certs.is_empty() {
        return Err(unreadable(path, "no certificate in the file"));
    }
    for c in &certs {
        check_validity(path, c)?;
    }
    Ok(certs)
}

fn check_validity(path: &Path, der: &CertificateDer<'_>) -> Result<(), TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| unreadable(path, format!("not an X.509 certificate: {e}")))?;
    let now = x509_parser::time::ASN1Time::now();
    let v = cert.validity();
    let why = if now > v.not_after {
        format!("expired on {}", v.not_after)
    } else if now < v.not_before {
        format!("is not valid before {}", v.not_before)
    } else {
        return Ok(());
    };
    Err(TlsError::Validity {
        path: path.to_path_buf(),
        why,
    })
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let mode = std::fs::metadata(path)
        .map_err(|e| unreadable(path, e))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyPermissions {
            path: path.to_path_buf(),
            mode: mode & 0o777,
        });
    }
    PrivateKeyDer::from_pem_file(path).map_err(|e| unreadable(path, e))
}

fn load_roots(dir: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let path = need(dir, CA_CERT)?;
    let mut roots = RootCertStore::empty();
    for c in load_certs(&path)? {
        roots
            .add(c)
            .map_err(|e| unreadable(&path, format!("unusable CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// A certificate chain and its key, checked to belong together.
fn load_pair(
    dir: &Path,
    cert: &str,
    key: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let cert_path = need(dir, cert)?;
    let key_path = need(dir, key)?;
    let certs = load_certs(&cert_path)?;
    let key = load_key(&key_path)?;
    let signing = provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| unreadable(&key_path, e))?;
    let certified = rustls::sign::CertifiedKey::new(certs.clone(), signing);
    certified.keys_match().map_err(|e| TlsError::KeyMismatch {
        cert: cert_path,
        key: key_path,
        why: e.to_string(),
    })?;
    Ok((certs, key))
}

fn config_err(e: impl ToString) -> TlsError {
    TlsError::Config(e.to_string())
}

fn build_server(dir: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let roots = load_roots(dir)?;
    let (certs, key) = load_pair(dir, SERVER_CERT, SERVER_KEY)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(config_err)?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(config_err)?;
    // Nothing resumes: one long-lived connection per primary.
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

fn build_client(dir: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = load_roots(dir)?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_err)?
        .with_root_certificates(roots);
    let has_cert = dir.join(CLIENT_CERT).exists() || dir.join(CLIENT_KEY).exists();
    let cfg = if has_cert {
        let (certs, key) = load_pair(dir, CLIENT_CERT, CLIENT_KEY)?;
        builder
            .with_client_auth_cert(certs, key)
            .map_err(config_err)?
    } else {
        log::warn!(
            "tls: {} has no {CLIENT_CERT}: connecting without a client certificate",
            dir.display()
        );
        builder.with_no_client_auth()
    };
    Ok(Arc::new(cfg))
}

fn read<T: Clone>(l: &RwLock<T>) -> T {
    l.read_or_recover().clone()
}

fn replace<T>(l: &RwLock<T>, v: T) {
    *l.write_or_recover() = v;
}

/// Server credentials (an NBD server's) and the identities allowed in.
#[derive(Debug)]
pub struct ServerTls {
    dir: PathBuf,
    authz: Vec<String>,
    config: RwLock<Arc<ServerConfig>>,
}

impl ServerTls {
    /// Loads `dir` (QEMU's `endpoint=server` layout). `authz` lists the client
    /// identities (subject DNs) allowed; empty allows any client whose
    /// certificate the CA signed.
    pub fn load(dir: &Path, authz: Vec<String>) -> Result<ServerTls, TlsError> {
        let config = build_server(dir)?;
        Ok(ServerTls {
            dir: dir.to_path_buf(),
            authz,
            config: RwLock::new(config),
        })
    }

    /// Reads the directory again; later handshakes use the new credentials.
    /// On error the old ones stay in force.
    pub fn reload(&self) -> Result<(), TlsError> {
        replace(&self.config, build_server(&self.dir)?);
        Ok(())
    }

    /// The configuration for the next handshake.
    pub fn config(&self) -> Arc<ServerConfig> {
        read(&self.config)
    }

    /// Checks a verified client's certificate against `--tls-authz`; returns
    /// its identity for log lines.
    pub fn authorise(&self, peer_certs: Option<&[CertificateDer<'_>]>) -> Result<String, TlsError> {
        let cert = peer_certs
            .and_then(|c| c.first())
            .ok_or_else(|| TlsError::NotAuthorised("(no client certificate)".into()))?;
        let identity = subject_dn(cert.as_ref())
            .map_err(|e| TlsError::NotAuthorised(format!("(unreadable certificate: {e})")))?;
        if self.authz.is_empty() || self.authz.contains(&identity) {
            Ok(identity)
        } else {
            Err(TlsError::NotAuthorised(identity))
        }
    }
}

/// Client credentials (the primary's) and the server name to check.
#[derive(Debug)]
pub struct ClientTls {
    dir: PathBuf,
    hostname: Option<ServerName<'static>>,
    config: RwLock<Arc<ClientConfig>>,
}

impl ClientTls {
    /// Loads `dir` (QEMU's `endpoint=client` layout). `hostname` is the name
    /// the server certificate must carry; `None` uses the host of the address
    /// connected to (`localhost` for a Unix socket).
    pub fn load(dir: &Path, hostname: Option<&str>) -> Result<ClientTls, TlsError> {
        let hostname = hostname
            .map(|h| {
                ServerName::try_from(h.to_string()).map_err(|_| TlsError::Hostname(h.to_string()))
            })
            .transpose()?;
        Ok(ClientTls {
            dir: dir.to_path_buf(),
            hostname,
            config: RwLock::new(build_client(dir)?),
        })
    }

    /// Reads the directory again for later connections; on error the old
    /// credentials stay in force.
    pub fn reload(&self) -> Result<(), TlsError> {
        replace(&self.config, build_client(&self.dir)?);
        Ok(())
    }

    /// The configuration for the next handshake.
    pub fn config(&self) -> Arc<ClientConfig> {
        read(&self.config)
    }

    /// The name to verify the server certificate against, given the host
    /// connected to (`None` for a Unix socket).
    pub fn server_name(&self, host: Option<&str>) -> Result<ServerName<'static>, TlsError> {
        if let Some(n) = &self.hostname {
            return Ok(n.clone());
        }
        let host = host.unwrap_or("localhost");
        let host = host.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(host.to_string()).map_err(|_| TlsError::Hostname(host.to_string()))
    }
}

/// Short names GnuTLS uses for subject attributes; others appear as dotted OIDs.
const SHORT_NAMES: &[(&str, &str)] = &[
    ("2.5.4.3", "CN"),
    ("2.5.4.6", "C"),
    ("2.5.4.7", "L"),
    ("2.5.4.8", "ST"),
    ("2.5.4.9", "STREET"),
    ("2.5.4.10", "O"),
    ("2.5.4.11", "OU"),
    ("2.5.4.12", "title"),
    ("2.5.4.5", "serialNumber"),
    ("0.9.2342.19200300.100.1.25", "DC"),
    ("0.9.2342.19200300.100.1.1", "UID"),
    ("1.2.840.113549.1.9.1", "EMAIL"),
];

/// A certificate's subject as QEMU (GnuTLS) renders it for authz: the RDNs
/// in certificate order (not RFC 4514's reversed order: qemu-nbd reports
/// `C=GB,O=Example,CN=client`), `+` inside a multi-valued RDN, special
/// characters escaped with a backslash.
pub fn subject_dn(der: &[u8]) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let mut rdns = Vec::new();
    for rdn in cert.subject().iter() {
        let mut parts = Vec::new();
        for attr in rdn.iter() {
            let oid = attr.attr_type().to_id_string();
            let name = SHORT_NAMES
                .iter()
                .find(|(o, _)| *o == oid)
                .map_or(oid.clone(), |(_, n)| (*n).to_string());
            let value = attr
                .as_str()
                .map_err(|_| format!("attribute {name} is not a string"))?;
            parts.push(format!("{name}={}", escape_dn_value(value)));
        }
        rdns.push(parts.join("+"));
    }
    Ok(rdns.join(","))
}

fn escape_dn_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=')
            || (i == 0 && (c == ' ' || c == '#'))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dn_values_with_separators_are_escaped() {
        assert_eq!(escape_dn_value("a,b+c"), "a\\,b\\+c");
        assert_eq!(escape_dn_value(" x "), "\\ x\\ ");
        assert_eq!(escape_dn_value("plain"), "plain");
    }

    #[test]
    fn psk_error_names_the_reason() {
        let msg = psk_unsupported().to_string();
        assert!(msg.contains("--tls-creds-psk") && msg.contains("rustls"));
    }
}
