//! TLS credentials for the replication link, in QEMU's layouts, so a COLO
//! setup's existing credentials carry over.
//!
//! `tls-creds-x509` (rustls):
//!
//! * server: `ca-cert.pem`, `server-cert.pem`, `server-key.pem`; the server
//!   asks every client for a certificate signed by the CA;
//! * client: `ca-cert.pem`, and `client-cert.pem` + `client-key.pem` (both
//!   optional, as in QEMU; a server that requires a client certificate then
//!   refuses the connection).
//!
//! `tls-creds-psk` ([`psk`], run on GnuTLS through [`gnutls`] because rustls
//! has no external pre-shared keys, rustls issue #174): a `keys.psk` file of
//! `username:hexkey` lines; the server picks the key by the client's
//! username, the client sends its own (QEMU's default `qemu`).
//!
//! Credentials are checked when loaded (missing file, key readable by others,
//! key not matching its certificate, certificate expired or not yet valid,
//! malformed keys.psk), so a bad setup fails at start with a message naming
//! the file, not at the first handshake. [`ServerTls::reload`] /
//! [`ClientTls::reload`] swap in new credentials for later handshakes;
//! established sessions are untouched.
//!
//! Client identities for `--tls-authz` are the certificate subject rendered
//! as QEMU's `authz-simple` sees it (GnuTLS `gnutls_x509_crt_get_dn`, checked
//! against qemu-nbd 10 in tests/nbd_tls.rs): the attributes in certificate
//! order, comma-separated, e.g. `C=GB,O=Example,CN=client`; with PSK, the
//! client's username.

pub mod gnutls;
pub mod psk;

use crate::sync::RwLockExt;
use psk::{PskKeys, PskLookup, Secret};
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
    /// A line of keys.psk that cannot be used.
    #[error("TLS credentials: {path}:{line}: {why}")]
    PskFile {
        /// The keys.psk file.
        path: PathBuf,
        /// The line (from 1).
        line: usize,
        /// What is wrong with it (never the key).
        why: String,
    },
    /// A keys.psk others may read.
    #[error(
        "TLS credentials: {path} holds pre-shared keys and is readable by group or \
         others (mode {mode:o}); run chmod 600 on it"
    )]
    PskPermissions {
        /// The keys.psk file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The client's username has no line in its keys.psk.
    #[error("TLS credentials: username {username:?} not found in {path} (--tls-psk-username)")]
    PskUsername {
        /// The username.
        username: String,
        /// The keys.psk file.
        path: PathBuf,
    },
    /// A client whose PSK username the server's keys.psk does not hold.
    #[error("TLS: PSK username {0:?} is not in keys.psk")]
    UnknownPskUser(String),
    /// GnuTLS (the PSK path) is missing or failed.
    #[error(transparent)]
    Gnutls(#[from] gnutls::GnutlsError),
}

/// ring's suites, AES-128-GCM first: the link carries bulk disk data, and
/// AES-128 needs fewer rounds than AES-256 for the same (ample) security
/// margin. Every default suite stays available for peers that prefer others.
fn provider() -> Arc<CryptoProvider> {
    // Newer rustls releases deprecate ring's provider (it has no
    // post-quantum key exchange); aws-lc-rs, the alternative, needs a C
    // toolchain and cmake at build time. The fuzz crate, which resolves the
    // newest rustls, sees the deprecation; this keeps both builds clean.
    #[allow(deprecated)]
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
    // The NBD layer seals and opens the records itself once the handshake
    // is done (nbd/tls/record.rs): rustls hands over the traffic keys.
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

fn build_client(dir: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = load_roots(dir)?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_err)?
        .with_root_certificates(roots);
    let has_cert = dir.join(CLIENT_CERT).exists() || dir.join(CLIENT_KEY).exists();
    let mut cfg = if has_cert {
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
    // As the server's: the NBD layer does the records (nbd/tls/record.rs).
    cfg.enable_secret_extraction = true;
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
    authz: Vec<String>,
    creds: ServerCreds,
}

#[derive(Debug)]
enum ServerCreds {
    X509 {
        dir: PathBuf,
        config: RwLock<Arc<ServerConfig>>,
    },
    Psk {
        file: PathBuf,
        keys: RwLock<Arc<PskKeys>>,
    },
}

impl ServerTls {
    /// Loads `dir` (QEMU's `tls-creds-x509,endpoint=server` layout). `authz`
    /// lists the client identities (subject DNs) allowed; empty allows any
    /// client whose certificate the CA signed.
    pub fn load(dir: &Path, authz: Vec<String>) -> Result<ServerTls, TlsError> {
        let config = build_server(dir)?;
        Ok(ServerTls {
            authz,
            creds: ServerCreds::X509 {
                dir: dir.to_path_buf(),
                config: RwLock::new(config),
            },
        })
    }

    /// Loads a keys.psk file (or QEMU's `tls-creds-psk,endpoint=server`
    /// directory holding one) and GnuTLS. `authz` lists the usernames
    /// allowed; empty allows every username of the file.
    pub fn load_psk(file: &Path, authz: Vec<String>) -> Result<ServerTls, TlsError> {
        gnutls::load()?;
        let keys = PskKeys::load(file)?;
        for id in &authz {
            if keys.get(id.as_bytes()).is_none() {
                log::warn!(
                    "tls: --tls-authz {id:?} has no key in {}: that client cannot connect",
                    keys.path().display()
                );
            }
        }
        Ok(ServerTls {
            authz,
            creds: ServerCreds::Psk {
                file: file.to_path_buf(),
                keys: RwLock::new(Arc::new(keys)),
            },
        })
    }

    /// Reads the credentials again; later handshakes use the new ones.
    /// On error the old ones stay in force.
    pub fn reload(&self) -> Result<(), TlsError> {
        match &self.creds {
            ServerCreds::X509 { dir, config } => replace(config, build_server(dir)?),
            ServerCreds::Psk { file, keys } => replace(keys, Arc::new(PskKeys::load(file)?)),
        }
        Ok(())
    }

    /// The directory or file the credentials come from.
    pub fn source(&self) -> &Path {
        match &self.creds {
            ServerCreds::X509 { dir, .. } => dir,
            ServerCreds::Psk { file, .. } => file,
        }
    }

    /// The rustls configuration for the next handshake; `None` with PSK.
    pub fn x509_config(&self) -> Option<Arc<ServerConfig>> {
        match &self.creds {
            ServerCreds::X509 { config, .. } => Some(read(config)),
            ServerCreds::Psk { .. } => None,
        }
    }

    /// True for `--tls-creds-psk` credentials.
    pub fn is_psk(&self) -> bool {
        matches!(self.creds, ServerCreds::Psk { .. })
    }

    /// The key for a client's PSK username, checked against `--tls-authz`
    /// (QEMU 10 itself does not apply authz to PSK usernames; colo-blk does).
    pub fn psk_lookup(&self, username: &[u8]) -> PskLookup {
        let ServerCreds::Psk { keys, .. } = &self.creds else {
            return PskLookup::Unknown;
        };
        let keys = read(keys);
        let Some(key) = keys.get(username) else {
            return PskLookup::Unknown;
        };
        let name = String::from_utf8_lossy(username);
        if self.authz.is_empty() || self.authz.iter().any(|a| *a == name) {
            PskLookup::Key(key.clone())
        } else {
            PskLookup::NotAuthorised
        }
    }

    /// Checks a verified client's certificate against `--tls-authz`; returns
    /// its identity for log lines.
    pub fn authorise(&self, peer_certs: Option<&[CertificateDer<'_>]>) -> Result<String, TlsError> {
        let cert = peer_certs
            .and_then(|c| c.first())
            .ok_or_else(|| TlsError::NotAuthorised("(no client certificate)".into()))?;
        let identity = subject_dn(cert.as_ref())
            .map_err(|e| TlsError::NotAuthorised(format!("(unreadable certificate: {e})")))?;
        self.authorise_identity(identity)
    }

    /// Checks an identity (a subject DN, a PSK username) against `--tls-authz`.
    pub fn authorise_identity(&self, identity: String) -> Result<String, TlsError> {
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
    creds: ClientCreds,
}

#[derive(Debug)]
enum ClientCreds {
    X509 {
        dir: PathBuf,
        hostname: Option<ServerName<'static>>,
        config: RwLock<Arc<ClientConfig>>,
    },
    Psk {
        file: PathBuf,
        username: String,
        key: RwLock<Secret>,
    },
}

fn client_key(file: &Path, username: &str) -> Result<Secret, TlsError> {
    let keys = PskKeys::load(file)?;
    keys.get(username.as_bytes())
        .cloned()
        .ok_or_else(|| TlsError::PskUsername {
            username: username.to_string(),
            path: keys.path().to_path_buf(),
        })
}

impl ClientTls {
    /// Loads `dir` (QEMU's `tls-creds-x509,endpoint=client` layout).
    /// `hostname` is the name the server certificate must carry; `None`
    /// uses the host of the address connected to (`localhost` for a Unix
    /// socket).
    pub fn load(dir: &Path, hostname: Option<&str>) -> Result<ClientTls, TlsError> {
        let hostname = hostname
            .map(|h| {
                ServerName::try_from(h.to_string()).map_err(|_| TlsError::Hostname(h.to_string()))
            })
            .transpose()?;
        Ok(ClientTls {
            creds: ClientCreds::X509 {
                dir: dir.to_path_buf(),
                hostname,
                config: RwLock::new(build_client(dir)?),
            },
        })
    }

    /// Loads the key of `username` from a keys.psk file (or QEMU's
    /// `tls-creds-psk,endpoint=client` directory holding one) and GnuTLS.
    pub fn load_psk(file: &Path, username: &str) -> Result<ClientTls, TlsError> {
        gnutls::load()?;
        let key = client_key(file, username)?;
        Ok(ClientTls {
            creds: ClientCreds::Psk {
                file: file.to_path_buf(),
                username: username.to_string(),
                key: RwLock::new(key),
            },
        })
    }

    /// Reads the credentials again for later connections; on error the old
    /// ones stay in force.
    pub fn reload(&self) -> Result<(), TlsError> {
        match &self.creds {
            ClientCreds::X509 { dir, config, .. } => replace(config, build_client(dir)?),
            ClientCreds::Psk {
                file,
                username,
                key,
            } => replace(key, client_key(file, username)?),
        }
        Ok(())
    }

    /// The directory or file the credentials come from.
    pub fn source(&self) -> &Path {
        match &self.creds {
            ClientCreds::X509 { dir, .. } => dir,
            ClientCreds::Psk { file, .. } => file,
        }
    }

    /// The rustls configuration for the next handshake; `None` with PSK.
    pub fn x509_config(&self) -> Option<Arc<ClientConfig>> {
        match &self.creds {
            ClientCreds::X509 { config, .. } => Some(read(config)),
            ClientCreds::Psk { .. } => None,
        }
    }

    /// The PSK username and key for the next handshake; `None` with x509.
    pub fn psk(&self) -> Option<(String, Secret)> {
        match &self.creds {
            ClientCreds::Psk { username, key, .. } => Some((username.clone(), read(key))),
            ClientCreds::X509 { .. } => None,
        }
    }

    /// The name to verify the server certificate against, given the host
    /// connected to (`None` for a Unix socket).
    pub fn server_name(&self, host: Option<&str>) -> Result<ServerName<'static>, TlsError> {
        if let ClientCreds::X509 {
            hostname: Some(n), ..
        } = &self.creds
        {
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
}
