//! Helpers shared by the integration tests: run the real `colo-blk` binary
//! ([`Daemon`]) and drive a vhost-user-blk socket through libblkio ([`Client`]).
//!
//! Use from a test file with `mod common;`.
#![allow(dead_code)]

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use std::ffi::OsStr;
use std::fs::File;
use std::mem::MaybeUninit;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_colo-blk");

/// How long to wait for a daemon to create its socket or to exit. Generous: the
/// machine is shared and slow; a healthy daemon needs milliseconds.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A running `colo-blk` process. Dropping it kills the process (by pid) and
/// reaps it, so no test leaves a daemon behind on any path, panics included.
pub struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts `colo-blk ARGS...` and waits until `socket` exists. The process's
    /// stderr goes to `log` (shown when a helper fails).
    pub fn spawn<I, S>(args: I, socket: &Path, log: &Path) -> Daemon
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let err = File::create(log).expect("create daemon log");
        let child = Command::new(BIN)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn colo-blk");
        let mut d = Daemon {
            child: Some(child),
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
        };
        d.wait_for_socket();
        d
    }

    /// `colo-blk serve --socket DIR/vhost.sock --disk DISK EXTRA...`, logging to
    /// DIR/serve.log.
    pub fn serve(dir: &Path, disk: &Path, extra: &[&str]) -> Daemon {
        let socket = dir.join("vhost.sock");
        let mut args: Vec<&OsStr> = vec![
            "serve".as_ref(),
            "--socket".as_ref(),
            socket.as_os_str(),
            "--disk".as_ref(),
            disk.as_os_str(),
        ];
        args.extend(extra.iter().map(|s| OsStr::new(*s)));
        Daemon::spawn(args, &socket, &dir.join("serve.log"))
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if is_socket(&self.socket) {
                return;
            }
            if let Some(status) = self.child_mut().try_wait().expect("try_wait") {
                panic!(
                    "colo-blk exited ({status}) before creating {}:\n{}",
                    self.socket.display(),
                    self.log()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "colo-blk did not create {} in {PATIENCE:?}:\n{}",
                    self.socket.display(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("daemon already reaped")
    }

    /// The vhost-user socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon already reaped").id()
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: kill only reads its integer arguments; the pid is our own
        // unreaped child, so it cannot have been recycled.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal})");
    }

    /// Waits for the daemon to exit on its own and returns its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child_mut().try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                panic!("colo-blk did not exit in {PATIENCE:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: as in `signal`; the child is not reaped yet.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
            let _ = child.wait();
        }
    }
}

/// True if `path` exists and is a Unix socket.
pub fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// A sparse file of `size` bytes at `path`.
pub fn sparse_image(path: &Path, size: u64) {
    File::create(path)
        .and_then(|f| f.set_len(size))
        .expect("create image");
}

/// Deterministic pseudo-random bytes (xorshift): patterns that differ per
/// offset and per seed, so misplaced data is caught.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A libblkio error: the errno of a failed request or setup step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoError {
    /// Positive errno.
    pub errno: i32,
    /// libblkio's message.
    pub message: String,
}

impl From<blkio::Error> for IoError {
    fn from(e: blkio::Error) -> Self {
        IoError {
            errno: e.errno().raw_os_error(),
            message: e.message().to_string(),
        }
    }
}

/// How to connect a [`Client`].
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions {
    /// Queues to use.
    pub num_queues: usize,
    /// Open read-only (required by libblkio when the device is read-only).
    pub read_only: bool,
    /// Bytes of shared buffer per queue (the largest single request).
    pub buf_per_queue: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            num_queues: 1,
            read_only: false,
            buf_per_queue: 2 << 20,
        }
    }
}

/// A libblkio "virtio-blk-vhost-user" frontend: what a VMM's virtio-blk driver
/// does, from a test. Data buffers live in memory mapped to the backend, as
/// vhost-user requires.
pub struct Client {
    // Field order matters: queues go before the Blkio instance that owns them.
    queues: Vec<Queue>,
    region: MemoryRegion,
    blkio: Blkio,
    /// Device capacity in bytes.
    pub capacity: u64,
}

/// One request queue with its own window of the shared buffer.
pub struct Queue {
    q: Blkioq,
    buf: *mut u8,
    len: usize,
}

// SAFETY: `buf` points into a mapping owned by the Client, which outlives its
// queues; each queue's window is disjoint from every other queue's, so a queue
// moved to another thread is the only one touching its window.
unsafe impl Send for Queue {}

impl Client {
    /// Connects with one queue.
    pub fn connect(socket: &Path) -> Result<Client, IoError> {
        Self::connect_with(socket, ClientOptions::default())
    }

    /// Connects, starts `opts.num_queues` queues and maps their buffers.
    pub fn connect_with(socket: &Path, opts: ClientOptions) -> Result<Client, IoError> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", socket.to_str().expect("utf-8 socket path"))?;
        blkio.set_bool("read-only", opts.read_only)?;
        blkio.connect()?;
        blkio.set_i32("num-queues", opts.num_queues as i32)?;
        let capacity = blkio.get_u64("capacity")?;
        let started = blkio.start()?;
        let total = opts.buf_per_queue * opts.num_queues;
        let region = blkio.alloc_mem_region(total)?;
        blkio.map_mem_region(&region)?;
        let queues = started
            .queues
            .into_iter()
            .enumerate()
            .map(|(i, q)| Queue {
                q,
                // In bounds: i < num_queues and the region holds num_queues windows.
                buf: (region.addr + i * opts.buf_per_queue) as *mut u8,
                len: opts.buf_per_queue,
            })
            .collect();
        Ok(Client {
            queues,
            region,
            blkio,
            capacity,
        })
    }

    /// Queue `i`.
    pub fn queue(&mut self, i: usize) -> &mut Queue {
        &mut self.queues[i]
    }

    /// All queues, e.g. to drive them from several threads at once.
    pub fn queues(&mut self) -> &mut [Queue] {
        &mut self.queues
    }

    /// Writes `data` at `offset` on queue 0.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        self.queues[0].write(offset, data)
    }

    /// Reads `len` bytes at `offset` on queue 0.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, IoError> {
        self.queues[0].read(offset, len)
    }

    /// Flushes on queue 0.
    pub fn flush(&mut self) -> Result<(), IoError> {
        self.queues[0].flush()
    }

    /// Discards on queue 0.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), IoError> {
        self.queues[0].discard(offset, len)
    }

    /// Write-zeroes on queue 0.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), IoError> {
        self.queues[0].write_zeroes(offset, len, unmap)
    }

    /// The libblkio instance, for properties.
    pub fn blkio(&self) -> &Blkio {
        &self.blkio
    }

    /// The shared buffer region.
    pub fn region(&self) -> &MemoryRegion {
        &self.region
    }
}

impl Queue {
    /// This queue's window of the shared buffer.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the window lies in the mapped region (see Client::connect_with)
        // and is only reachable through this exclusive borrow.
        unsafe { std::slice::from_raw_parts_mut(self.buf, self.len) }
    }

    /// Writes `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        self.buf()[..data.len()].copy_from_slice(data);
        self.q
            .write(offset, self.buf, data.len(), 0, ReqFlags::empty());
        self.complete_one()
    }

    /// Writes `data` at `offset` as `pieces` separate buffers (one request with
    /// several data descriptors).
    pub fn writev(&mut self, offset: u64, data: &[u8], pieces: usize) -> Result<(), IoError> {
        self.buf()[..data.len()].copy_from_slice(data);
        let iov = self.iovecs(data.len(), pieces);
        self.q
            .writev(offset, iov.as_ptr(), iov.len() as u32, 0, ReqFlags::empty());
        self.complete_one()
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, IoError> {
        self.q.read(offset, self.buf, len, 0, ReqFlags::empty());
        self.complete_one()?;
        Ok(self.buf()[..len].to_vec())
    }

    /// Reads `len` bytes at `offset` into `pieces` separate buffers.
    pub fn readv(&mut self, offset: u64, len: usize, pieces: usize) -> Result<Vec<u8>, IoError> {
        let iov = self.iovecs(len, pieces);
        self.q
            .readv(offset, iov.as_ptr(), iov.len() as u32, 0, ReqFlags::empty());
        self.complete_one()?;
        Ok(self.buf()[..len].to_vec())
    }

    /// Flushes the device's write cache.
    pub fn flush(&mut self) -> Result<(), IoError> {
        self.q.flush(0, ReqFlags::empty());
        self.complete_one()
    }

    /// Discards `[offset, offset + len)`.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), IoError> {
        self.q.discard(offset, len, 0, ReqFlags::empty());
        self.complete_one()
    }

    /// Zeroes `[offset, offset + len)`, letting the device unmap if `unmap`.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), IoError> {
        let flags = if unmap {
            ReqFlags::empty()
        } else {
            ReqFlags::NO_UNMAP
        };
        self.q.write_zeroes(offset, len, 0, flags);
        self.complete_one()
    }

    /// Splits the first `len` bytes of the window into `pieces` iovecs whose
    /// lengths are multiples of 512 (the last one takes the rest).
    fn iovecs(&mut self, len: usize, pieces: usize) -> Vec<libc::iovec> {
        let pieces = pieces.clamp(1, (len / 512).max(1));
        let step = len / pieces / 512 * 512;
        (0..pieces)
            .map(|i| {
                let start = i * step;
                let end = if i + 1 == pieces { len } else { start + step };
                libc::iovec {
                    // SAFETY: start < len <= window length.
                    iov_base: unsafe { self.buf.add(start) }.cast(),
                    iov_len: end - start,
                }
            })
            .collect()
    }

    /// Waits for the single outstanding request.
    fn complete_one(&mut self) -> Result<(), IoError> {
        let mut done = [const { MaybeUninit::<Completion>::uninit() }; 1];
        let mut timeout = PATIENCE;
        let n = self.q.do_io(&mut done, 1, Some(&mut timeout), None)?;
        assert_eq!(n, 1, "do_io returned without a completion");
        // SAFETY: do_io initialised the first `n` completions.
        let c = unsafe { done[0].assume_init_read() };
        if c.ret < 0 {
            let message = if c.error_msg.is_null() {
                String::new()
            } else {
                // SAFETY: a failed completion carries a pointer to one of
                // libblkio's static NUL-terminated messages.
                unsafe { std::ffi::CStr::from_ptr(c.error_msg) }
                    .to_string_lossy()
                    .into_owned()
            };
            return Err(IoError {
                errno: -c.ret,
                message,
            });
        }
        Ok(())
    }
}
