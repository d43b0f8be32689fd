//! QEMU's `tls-creds-psk` credentials: a `keys.psk` file of
//! `username:hexkey` lines, as GnuTLS's `psktool -u NAME -p FILE` writes it
//! and GnuTLS reads it.
//!
//! * A server picks the key by the username the client sends; a client uses
//!   the line of its own username (QEMU's default: `qemu`).
//! * As in GnuTLS, the username is everything before the first `:`, and a
//!   line `#HEX:key` names a username given in hex. A line starting with `#`
//!   that is not that is a comment; blank lines are skipped; the first line
//!   of a username wins.
//! * Stricter than GnuTLS, which skips what it cannot parse: a line without
//!   `:`, a key that is not an even number of hex digits, or a file readable
//!   by group or others is refused at start, naming the file and line.

use super::TlsError;
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The file QEMU reads in a `tls-creds-psk` directory.
pub const KEYS_FILE: &str = "keys.psk";
/// The username QEMU's PSK client uses when none is given.
pub const DEFAULT_USERNAME: &str = "qemu";

/// Key bytes, zeroed when dropped; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// The key.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: `b` is a valid, exclusive reference into our buffer;
            // a volatile write is not optimised away before the free.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// What a server's key lookup answers for a username.
#[derive(Debug)]
pub enum PskLookup {
    /// Known and allowed: this key.
    Key(Secret),
    /// Not in keys.psk.
    Unknown,
    /// In keys.psk, not in `--tls-authz`.
    NotAuthorised,
}

/// The parsed keys of a `keys.psk` file.
#[derive(Debug, Clone)]
pub struct PskKeys {
    path: PathBuf,
    entries: Vec<(Vec<u8>, Secret)>,
}

fn bad(path: &Path, line: usize, why: impl Into<String>) -> TlsError {
    TlsError::PskFile {
        path: path.to_path_buf(),
        line,
        why: why.into(),
    }
}

fn hex(s: &[u8]) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// `FILE`, or `DIR/keys.psk` when given QEMU's directory.
pub fn keys_path(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(KEYS_FILE)
    } else {
        path.to_path_buf()
    }
}

impl PskKeys {
    /// Reads `path` (a file, or a directory holding `keys.psk`): missing,
    /// readable by group or others, or malformed is an error.
    pub fn load(path: &Path) -> Result<PskKeys, TlsError> {
        let path = keys_path(path);
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(TlsError::Missing { path })
            }
            Err(e) => {
                return Err(TlsError::Unreadable {
                    path,
                    why: e.to_string(),
                })
            }
        };
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(TlsError::PskPermissions {
                path,
                mode: mode & 0o777,
            });
        }
        let text = std::fs::read(&path).map_err(|e| TlsError::Unreadable {
            path: path.clone(),
            why: e.to_string(),
        })?;
        PskKeys::parse(&path, &text)
    }

    /// Parses the text of a keys.psk file; `path` is for messages.
    pub fn parse(path: &Path, text: &[u8]) -> Result<PskKeys, TlsError> {
        let mut entries: Vec<(Vec<u8>, Secret)> = Vec::new();
        for (i, raw) in text.split(|&b| b == b'\n').enumerate() {
            let n = i + 1;
            let line = raw.trim_ascii_end();
            if line.is_empty() {
                continue;
            }
            let colon = line.iter().position(|&b| b == b':');
            let name = match (line[0], colon) {
                (b'#', Some(c)) => match hex(&line[1..c]) {
                    Some(name) if !name.is_empty() => name,
                    _ => continue, // a comment that happens to hold a ':'
                },
                (b'#', None) => continue,
                (_, None) => return Err(bad(path, n, "no ':' between username and key")),
                (_, Some(0)) => return Err(bad(path, n, "empty username")),
                (_, Some(c)) => line[..c].to_vec(),
            };
            let c = colon.unwrap_or(0);
            let shown = String::from_utf8_lossy(&name).into_owned();
            let key = hex(&line[c + 1..]).ok_or_else(|| {
                bad(
                    path,
                    n,
                    format!("the key of {shown:?} is not an even number of hex digits"),
                )
            })?;
            if key.is_empty() {
                return Err(bad(path, n, format!("the key of {shown:?} is empty")));
            }
            if entries.iter().any(|(u, _)| *u == name) {
                log::warn!(
                    "tls: {}:{n}: username {shown:?} again; its first line is used, as GnuTLS does",
                    path.display()
                );
                continue;
            }
            entries.push((name, Secret(key)));
        }
        if entries.is_empty() {
            return Err(TlsError::Unreadable {
                path: path.to_path_buf(),
                why: "no username:hexkey line (psktool -u NAME -p FILE writes one)".into(),
            });
        }
        Ok(PskKeys {
            path: path.to_path_buf(),
            entries,
        })
    }

    /// The key of `username`.
    pub fn get(&self, username: &[u8]) -> Option<&Secret> {
        self.entries
            .iter()
            .find(|(u, _)| u == username)
            .map(|(_, k)| k)
    }

    /// The file read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The number of usernames.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no username is known (never, after a successful parse).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PskKeys, TlsError> {
        PskKeys::parse(Path::new("/k/keys.psk"), text.as_bytes())
    }

    #[test]
    fn psktool_lines_comments_blank_lines_and_hex_usernames() {
        let k = parse(
            "qemu:00112233445566778899aabbccddeeff\n\
             \n\
             # rotated 2024-05-01: the old key is gone\n\
             #616c696365:ABCDEF\r\n\
             bob:0102 \n\
             qemu:ffff\n",
        )
        .unwrap();
        assert_eq!(k.len(), 3);
        assert_eq!(
            k.get(b"qemu").unwrap().bytes(),
            &[
                0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                0xee, 0xff
            ]
        );
        assert_eq!(k.get(b"alice").unwrap().bytes(), &[0xab, 0xcd, 0xef]);
        assert_eq!(k.get(b"bob").unwrap().bytes(), &[1, 2]);
        assert!(k.get(b"qem").is_none());
        assert!(format!("{:?}", k.get(b"qemu").unwrap()).contains("16 bytes"));
    }

    #[test]
    fn malformed_lines_are_refused_with_file_and_line() {
        for (text, line, why) in [
            ("qemu:0011\nnocolon\n", 2, "no ':'"),
            ("qemu:001\n", 1, "hex digits"),
            ("qemu:zz11\n", 1, "hex digits"),
            ("\n\nqemu:\n", 3, "empty"),
            (":0011\n", 1, "empty username"),
        ] {
            match parse(text) {
                Err(e @ TlsError::PskFile { line: l, .. }) => {
                    let msg = e.to_string();
                    assert_eq!(l, line, "{msg}");
                    assert!(msg.contains(why) && msg.contains("/k/keys.psk"), "{msg}");
                    assert!(!msg.contains("0011"), "a key leaked into {msg}");
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
        assert!(matches!(
            parse("# only a comment\n"),
            Err(TlsError::Unreadable { .. })
        ));
    }

    #[test]
    fn a_directory_means_its_keys_psk_and_permissions_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(KEYS_FILE);
        match PskKeys::load(dir.path()) {
            Err(TlsError::Missing { path }) => assert_eq!(path, file),
            other => panic!("{other:?}"),
        }
        std::fs::write(&file, "qemu:0011\n").unwrap();
        std::fs::set_permissions(&file, PermissionsExt::from_mode(0o644)).unwrap();
        let e = PskKeys::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&file, PermissionsExt::from_mode(0o600)).unwrap();
        assert_eq!(PskKeys::load(dir.path()).unwrap().path(), file);
        assert_eq!(PskKeys::load(&file).unwrap().len(), 1);
    }
}
