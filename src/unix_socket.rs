//! Listening Unix sockets whose path appears atomically, already accepting.
//!
//! `UnixListener::bind` creates the socket file at bind(), a moment before
//! listen(), and with the umask's mode; a client that waits for the path (as
//! VMMs and COLO scripts do) can then get `ECONNREFUSED`, or reach a socket that
//! should have been private. [`bind`] instead binds and listens inside a private
//! (0700) staging directory next to the final path, sets the requested mode,
//! and only then hard-links the socket to the final path: the path never
//! exists without a listener behind it, and has its final mode from the start.
//! A hard link, unlike rename(), never replaces a socket that appeared
//! meanwhile.

use std::ffi::{OsStr, OsString};
use std::fs::{DirBuilder, File};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use thiserror::Error;

/// Longest path `sockaddr_un.sun_path` holds (108 bytes with the NUL).
pub const MAX_PATH_LEN: usize = 107;

/// How often to retry when another process creates the path between our
/// check and our link.
const PUBLISH_ATTEMPTS: usize = 3;

/// Why a socket could not be created.
#[derive(Debug, Error)]
pub enum UnixSocketError {
    /// The path does not fit in `sun_path`, so clients could not connect to it.
    #[error("socket path {path} is too long ({len} bytes, at most {MAX_PATH_LEN})")]
    PathTooLong {
        /// The path as given.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// The path has no file name (`/`, `..`, empty).
    #[error("socket path {0:?} does not name a file")]
    NoFileName(PathBuf),
    /// A process is listening on the path.
    #[error("socket {0}: another process is listening on it")]
    InUse(PathBuf),
    /// Something other than a socket is at the path.
    #[error("socket {0}: exists and is not a socket")]
    NotASocket(PathBuf),
    /// A system call failed.
    #[error("socket {path}: cannot {op}: {source}")]
    Io {
        /// The final socket path.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// What failed.
        #[source]
        source: io::Error,
    },
}

/// The socket file at a published path. Dropping it removes the file, unless
/// the path no longer names our socket.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// The path clients connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        // A later daemon may already own the path (ours was unlinked by hand
        // and the path reused): leave its socket alone.
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {
                let _ = std::fs::remove_file(&self.path);
            }
            _ => {}
        }
    }
}

/// Creates a socket listening at `path` with permissions `mode` (`None`: as
/// the umask gives). The path appears atomically, already accepting and with
/// its final mode. A stale socket at `path` (nobody listening) is replaced;
/// a live one, or anything that is not a socket, is an error. No temporary
/// file is left behind on any error.
pub fn bind(path: &Path, mode: Option<u32>) -> Result<(UnixListener, SocketFile), UnixSocketError> {
    let len = path.as_os_str().len();
    if len > MAX_PATH_LEN {
        return Err(UnixSocketError::PathTooLong {
            path: path.to_owned(),
            len,
        });
    }
    let name = path
        .file_name()
        .ok_or_else(|| UnixSocketError::NoFileName(path.to_owned()))?;
    let io_err = |op| {
        move |source| UnixSocketError::Io {
            path: path.to_owned(),
            op,
            source,
        }
    };
    let parent = path.parent().unwrap_or(Path::new(""));
    let staging =
        Staging::create(parent, name).map_err(io_err("create a staging directory beside it"))?;
    let listener = staging.bind().map_err(io_err("bind"))?;
    if let Some(mode) = mode {
        std::fs::set_permissions(&staging.socket, std::fs::Permissions::from_mode(mode))
            .map_err(io_err("set permissions"))?;
    }
    let meta = std::fs::symlink_metadata(&staging.socket).map_err(io_err("inspect"))?;
    publish(&staging.socket, path)?;
    Ok((
        listener,
        SocketFile {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        },
    ))
}

/// Links `staged` to `path`, replacing a stale socket but nothing else.
fn publish(staged: &Path, path: &Path) -> Result<(), UnixSocketError> {
    for _ in 0..PUBLISH_ATTEMPTS {
        clear_stale(path)?;
        match std::fs::hard_link(staged, path) {
            Ok(()) => return Ok(()),
            // Created since clear_stale looked: look again.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(source) => {
                return Err(UnixSocketError::Io {
                    path: path.to_owned(),
                    op: "link into place",
                    source,
                })
            }
        }
    }
    Err(UnixSocketError::InUse(path.to_owned()))
}

/// Removes a socket nobody listens on; refuses anything else at `path`.
fn clear_stale(path: &Path) -> Result<(), UnixSocketError> {
    let io_err = |op, source| UnixSocketError::Io {
        path: path.to_owned(),
        op,
        source,
    };
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("inspect", e)),
        Ok(m) if !m.file_type().is_socket() => {
            return Err(UnixSocketError::NotASocket(path.to_owned()))
        }
        Ok(_) => {}
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(UnixSocketError::InUse(path.to_owned())),
        // Left by a process that died without cleaning up.
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    Err(io_err("remove the stale socket", e))
                }
                _ => Ok(()),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("check whether the socket is in use", e)),
    }
}

/// A private directory beside the final path, where the socket is bound and
/// made ready before anyone can see it. Dropping it removes it and its socket.
struct Staging {
    dir: PathBuf,
    socket: PathBuf,
}

impl Staging {
    fn create(parent: &Path, name: &OsStr) -> io::Result<Staging> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let pid = std::process::id();
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let mut dir_name = OsString::from(".");
            dir_name.push(name);
            dir_name.push(format!(".{pid}.{n}.tmp"));
            let dir = parent.join(dir_name);
            // 0700: nobody else can connect before the mode is final.
            match DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {
                    let socket = dir.join("s");
                    return Ok(Staging { dir, socket });
                }
                // Left by a crashed process that had our pid.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn bind(&self) -> io::Result<UnixListener> {
        if self.socket.as_os_str().len() <= MAX_PATH_LEN {
            return UnixListener::bind(&self.socket);
        }
        // The staging name is longer than the final one: reach the directory
        // through its descriptor, which gives a short path.
        let dir = File::open(&self.dir)?;
        UnixListener::bind(format!("/proc/self/fd/{}/s", dir.as_raw_fd()))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests;
